"""Loading of the native extensions, once, with the reason when one is missing.

``thresher._C`` (CPU kernels) and ``thresher._C_cuda`` (CUDA kernels) are optional: the
reference backend always works. When ``_C`` cannot be loaded, the first op that would have
used it warns once with the reason; ``native_status()`` reports both at any time.

OpenMP: PyTorch wheels ship their own OpenMP runtime (a renamed libgomp); ``_C`` links the
system one, so a process holds two thread pools. An idle libgomp pool spins for a while
after each parallel region (GOMP_SPINCOUNT), which would steal the cores PyTorch's next op
needs. We load ``_C``'s runtime with ``OMP_WAIT_POLICY=PASSIVE`` (its threads sleep at once
after a region) and restore the environment afterwards, so neither pool oversubscribes the
other and user settings for PyTorch's runtime are untouched.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_modules: dict[str, ModuleType | None] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


def _load(name: str) -> ModuleType | None:
    if name in _modules:
        return _modules[name]
    saved = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY",)}
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        mod = importlib.import_module(f"thresher.{name}")
    except Exception as exc:  # noqa: BLE001 - any failure means "not available, here is why"
        mod = None
        _reasons[name] = f"thresher.{name} could not be imported: {type(exc).__name__}: {exc}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _modules[name] = mod
    return mod


def cpu_ext() -> ModuleType | None:
    """The C++ CPU extension, or None (reason in ``native_status()``)."""
    return _load("_C")


def cuda_ext() -> ModuleType | None:
    """The CUDA extension, or None (reason in ``native_status()``)."""
    return _load("_C_cuda")


def missing_reason(name: str) -> str | None:
    _load(name)
    return _reasons.get(name)


def warn_missing_once(name: str) -> None:
    reason = missing_reason(name)
    if reason and name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"{reason}. thresher runs its reference (PyTorch) backend instead; reinstall with "
            "a C++ compiler (pip install -e . -v shows the build log) for the fast CPU kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


def native_status() -> dict[str, str]:
    """``{"_C": "loaded" | reason, "_C_cuda": "loaded" | reason}``."""
    return {n: (_reasons.get(n) if _load(n) is None else "loaded") for n in ("_C", "_C_cuda")}


def num_threads() -> int:
    return max(1, torch.get_num_threads())


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
