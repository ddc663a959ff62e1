"""thresher.ops: validated, dispatched, differentiable kernels (one file per op family)."""
from ._dispatch import BACKEND_NAMES, BackendUnavailableError
from ._native import native_status
from thresher.core.constants import IGNORE_INDEX
from .compress import (
    dequantize_blockwise,
    quant_nbytes,
    quantize_blockwise,
    topk_decode,
    topk_encode,
    topk_nbytes,
)
from .cross_entropy import (
    CrossEntropyOutput,
    LinearWeightedCrossEntropyLoss,
    WeightedCrossEntropyLoss,
    linear_weighted_cross_entropy,
    weighted_cross_entropy,
)
from .lowrank import choose_side, lowrank_adam_step, project, project_back, refresh_projection

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "native_status",
    "IGNORE_INDEX",
    # cross_entropy
    "weighted_cross_entropy",
    "linear_weighted_cross_entropy",
    "WeightedCrossEntropyLoss",
    "LinearWeightedCrossEntropyLoss",
    "CrossEntropyOutput",
    # lowrank
    "choose_side",
    "project",
    "project_back",
    "refresh_projection",
    "lowrank_adam_step",
    # compress
    "topk_encode",
    "topk_decode",
    "quantize_blockwise",
    "dequantize_blockwise",
    "topk_nbytes",
    "quant_nbytes",
]
