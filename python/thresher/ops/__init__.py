"""thresher.ops: validated, dispatched, differentiable kernels (one file per op family)."""
from ._dispatch import BACKEND_NAMES, BackendUnavailableError
from ._native import native_status
from .cross_entropy import (
    LinearWeightedCrossEntropyLoss,
    WeightedCrossEntropyLoss,
    linear_weighted_cross_entropy,
    weighted_cross_entropy,
)

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "native_status",
    "weighted_cross_entropy",
    "linear_weighted_cross_entropy",
    "WeightedCrossEntropyLoss",
    "LinearWeightedCrossEntropyLoss",
]
