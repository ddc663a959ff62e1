"""The argument checks of the whole library (ops, optimizers, selectors, models, jobs) and its
shared constants: each check names the argument and says what was expected. Type problems
raise TypeError, value/shape/device problems ValueError. No torch at import: the scalar checks
serve the command's argument parsing and the data readers too, which answer without loading
torch (``thresher score --help``); a tensor check imports torch when called, by a caller that
holds a tensor and so has already loaded it."""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Iterable, Sequence

from .constants import DOCUMENT_REDUCTIONS, IGNORE_INDEX, LOSS_REDUCTIONS  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Checks ``t`` is a tensor with the given rank, dtype, device and shape (None in
    ``shape`` matches any size) and returns it."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(t.shape)}"
            )
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(
                f"{name} must have dtype {' or '.join(_dt(d) for d in dtypes)}, got {_dt(t.dtype)}"
            )
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def values_checkable() -> bool:
    """Checks of tensor *values* need the data on the host (one sync). Under torch.compile a
    graph cannot branch on data, so value checks are skipped there (shapes, dtypes and
    devices are still checked at trace time); run the function eagerly once to vet data."""
    import torch

    return not torch.compiler.is_compiling()


def check_weights(name: str, w: torch.Tensor) -> None:
    """Weights must be finite and non-negative (one fused check, one host sync)."""
    if w.numel() == 0 or not values_checkable():
        return
    import torch

    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        first = w[bad].flatten()[0].item()
        raise ValueError(f"{name} must be finite and non-negative, found {first}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float, *, finite: bool = False) -> None:
    """``lo <= value <= hi`` (NaN fails); ``finite``: also not +-inf. Any real number but a
    bool (numpy scalars too, as :func:`check_int` takes numpy integers)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    if finite and value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """2-D view whose last dim is contiguous (kernels take a row stride); copies only when
    the last dim is strided."""
    if t.stride(-1) != 1 or (t.dim() == 2 and t.size(0) > 1 and t.stride(0) < t.size(1)):
        t = t.contiguous()
    return t


def check_finite_range(name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
                       lo_open: bool = False, hi_open: bool = False) -> float:
    """``check_range`` that also refuses NaN and +-inf (an infinite learning rate, eps or
    weight decay turns every update into inf or NaN) and can exclude either end. The one
    check every hyper-parameter of the ops and optimizers goes through."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    check_range(name, value, -math.inf, math.inf)  # a real number
    if not ((lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {value}")
    return float(value)


def check_has_data(name: str, t: torch.Tensor) -> None:
    """Refuses meta tensors (shape and dtype only, no storage): the ops read values (finite
    checks, the step count, the kernels' pointers), which a meta tensor does not have."""
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor (no data): move it to a CPU or CUDA "
                         "device first, e.g. module.to_empty(device=...) and initialise it "
                         "(for shapes only, trace with torch.compile, whose fake tensors the "
                         "ops support)")


def check_int(name: str, v, lo: int = 1) -> int:
    """An integer (a Python or numpy one, not a bool) >= ``lo``, as an int."""
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def check_optional_int(name: str, v, lo: int = 1) -> int | None:
    """None (the caller's "not set"), or :func:`check_int`'s integer >= ``lo``."""
    return None if v is None else check_int(name, v, lo)


def check_float(name: str, v, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False) -> float:
    """A finite number in [lo, hi] ((lo, hi] with ``lo_open``)."""
    return check_finite_range(name, v, lo, hi, lo_open=lo_open)


def check_betas(betas, name: str = "betas") -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    out = tuple(check_float(f"{name}[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
    for i, b in enumerate(out):
        if b == 1.0:  # the bias correction 1 - beta^t would be 0
            raise ValueError(f"{name}[{i}] must be < 1, got {b}")
    return out
