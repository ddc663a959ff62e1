"""thresher: efficient language-model pretraining -- data selection and communication-
efficient optimisation on one layer of fused kernels.

The subpackages and the names below are imported on first use, so ``import thresher`` (and
the ``thresher`` command's help) does not wait for torch.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("thresher")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

_SUBPACKAGES = ("comm", "core", "data", "integrations", "jobs", "models", "ops", "optim", "selection")
_FROM_OPS = (
    "BackendUnavailableError",
    "LinearWeightedCrossEntropyLoss",
    "WeightedCrossEntropyLoss",
    "linear_weighted_cross_entropy",
    "native_status",
    "weighted_cross_entropy",
)

__all__ = ["__version__", *_SUBPACKAGES, *_FROM_OPS]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        value = import_module(f".{name}", __name__)
    elif name in _FROM_OPS:
        value = getattr(import_module(".ops", __name__), name)
    else:
        raise AttributeError(f"module 'thresher' has no attribute {name!r}")
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
