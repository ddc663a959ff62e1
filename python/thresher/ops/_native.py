"""Loading of the optional native extensions, once, with the reason when one is missing:
``thresher._C`` (CPU kernels) and ``thresher._C_cuda`` (CUDA kernels); the reference backend
always works. The first op that would have used a missing ``_C`` warns once with the reason;
``native_status()`` reports both at any time. Also the helpers the backends pass to the
kernels (dtype codes, pointers, thread count, CUDA stream). How ``_C`` shares PyTorch's
OpenMP runtime: docs/kernels.md ("Dispatch and the native extensions").
"""
from __future__ import annotations

import importlib
import os
import shutil
import warnings
from types import ModuleType

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_modules: dict[str, ModuleType | None] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


def _nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


def not_built_reason(name: str) -> str:
    """Why ``thresher.<name>`` was (most likely) never built, judged from this environment by
    the rules setup.py applies at install time."""
    if name == "_C":
        return ("thresher._C was not built (the C++ build failed or was skipped at install; "
                "pip install -e . -v shows the build log)")
    flag = os.environ.get("THRESHER_CUDA", "")
    if flag == "0":
        why = "THRESHER_CUDA=0 turns it off"
    elif not _nvcc_found():
        why = "no nvcc was found (CUDA_HOME, PATH, /usr/local/cuda)"
    elif flag != "1" and torch.version.cuda is None:
        why = ("torch is a CPU build (torch.version.cuda is None) and THRESHER_CUDA is not set "
               "to 1, so setup.py skips it; reinstall with THRESHER_CUDA=1 pip install -e .")
    else:
        why = "nvcc and the settings to build it are present now: reinstall (pip install -e .)"
    return f"thresher._C_cuda was not built: {why}"


def _load(name: str) -> ModuleType | None:
    if name in _modules:
        return _modules[name]
    try:
        mod = importlib.import_module(f"thresher.{name}")
    except ModuleNotFoundError as exc:
        mod = None
        _reasons[name] = not_built_reason(name) if exc.name == f"thresher.{name}" else \
            f"thresher.{name} could not be imported: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure means "not available, here is why"
        mod = None
        _reasons[name] = f"thresher.{name} could not be imported: {type(exc).__name__}: {exc}"
    if mod is not None and hasattr(mod, "runtime_status"):
        # _C_cuda imports without a GPU; it can run only where the CUDA runtime it was built
        # against finds a device and a new enough driver.
        why = mod.runtime_status()
        if why:
            mod = None
            _reasons[name] = f"thresher.{name} is built but cannot run here: {why}"
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


def cuda_stream(t: torch.Tensor) -> int:
    """The handle of the current CUDA stream of ``t``'s device (the CUDA launchers' last
    argument)."""
    return torch.cuda.current_stream(t.device).cuda_stream

