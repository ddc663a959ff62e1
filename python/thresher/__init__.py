"""thresher: efficient language-model pretraining -- data selection and communication-
efficient optimisation on one layer of fused kernels."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import comm, data, models, optim, selection
from .ops import (
    LinearWeightedCrossEntropyLoss,
    WeightedCrossEntropyLoss,
    linear_weighted_cross_entropy,
    native_status,
    weighted_cross_entropy,
)

try:
    __version__ = _version("thresher")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "comm",
    "data",
    "models",
    "optim",
    "selection",
    "native_status",
    "weighted_cross_entropy",
    "linear_weighted_cross_entropy",
    "WeightedCrossEntropyLoss",
    "LinearWeightedCrossEntropyLoss",
]
