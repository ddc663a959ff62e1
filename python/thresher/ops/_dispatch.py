"""The one backend-dispatch mechanism every thresher op uses: each op family declares its
backends once, in preference order, as ``BackendSpec``s (devices, dtypes, availability, shape
limits); ``Dispatcher.select`` resolves ``backend="auto"`` to the first backend with no
objection, and a named backend to itself or to a ``BackendUnavailableError`` listing every
reason it cannot run -- never a silent fallback. The rules: docs/architecture.md ("Op
dispatch"); why selection stays traceable by ``torch.compile(fullgraph=True)``:
docs/kernels.md ("Dispatch and the native extensions").
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

# "torch": composed of plain differentiable PyTorch ops (twice differentiable, torch.func
# compatible; materialises full-size intermediates) -- only ops that declare it have it.
BACKEND_NAMES = ("auto", "reference", "cpu", "triton", "cuda", "torch")


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run these inputs; the message lists every reason."""


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_module(family: str):
    """``thresher.kernels.<family>``, imported at first use: TRITON_INTERPRET is read when
    triton is imported, so the choice must not be made at thresher's import."""
    return importlib.import_module(f"thresher.kernels.{family}")


def triton_available(family: str) -> Callable[[], str | None]:
    """A BackendSpec ``available`` check for the family's Triton kernels."""

    def check() -> str | None:
        try:
            triton_module(family)
        except Exception as exc:  # noqa: BLE001
            return f"'triton' needs the triton package ({type(exc).__name__}: {exc})"
        return None

    return check


def extension_available(name: str, symbol: str | None = None) -> Callable[[], str | None]:
    """A BackendSpec ``available`` check for ``thresher._C`` / ``thresher._C_cuda`` (and, with
    ``symbol``, that the loaded build has that op family's entry point)."""
    from . import _native

    def check() -> str | None:
        why = _native.missing_reason(name)
        if why:
            return f"'{'cpu' if name == '_C' else 'cuda'}' needs {why}"
        if symbol is not None and not hasattr(_native._load(name), symbol):
            return f"thresher.{name} was built without {symbol} (rebuild: pip install -e .)"
        return None

    return check


def on_device(x):
    """Kernels launch on the current CUDA device: make it the tensor's device (multi-GPU
    processes where another device is current). A no-op on CPU (interpreter tests)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@dataclass(frozen=True)
class BackendSpec:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    # Returns None when usable in this process, else why not (e.g. extension not built).
    available: Callable[[], str | None] = lambda: None
    # Returns None when the problem (keyword facts from the op: vocab size, ...) fits.
    limits: Callable[..., str | None] = lambda **problem: None
    # Devices on which "auto" may choose it (the Triton interpreter runs on CPU, but slowly:
    # it is for tests, so auto never picks it there).
    auto_devices: tuple[str, ...] | None = None
    # Called when auto passes over this backend (e.g. to warn once that _C is missing).
    on_skip: Callable[[], None] | None = field(default=None, compare=False)


_DISPATCHERS: dict[str, "Dispatcher"] = {}

# The availability checks import modules (thresher._C, triton), which dynamo cannot trace:
# these two run them eagerly at trace time and the graph keeps the result as a constant, so
# selection works even when a process's first thresher call is inside a compiled region.


@torch.compiler.assume_constant_result
def _availability(op: str, backend: str) -> str:
    """Why backend ``backend`` of ``op`` is not available in this process ("" when it is)."""
    return _DISPATCHERS[op].specs[backend].available() or ""


@torch.compiler.assume_constant_result
def _skipped(op: str, backend: str) -> bool:
    """Runs the backend's on_skip hook (a warning, once) outside any traced graph."""
    _DISPATCHERS[op].specs[backend].on_skip()
    return True


class Dispatcher:
    def __init__(self, op: str, specs: Sequence[BackendSpec]):
        self.op = op
        self.specs: Mapping[str, BackendSpec] = {s.name: s for s in specs}
        _DISPATCHERS[op] = self

    def reasons(self, name: str, device: torch.device, dtype: torch.dtype, **problem) -> list[str]:
        """Every reason backend ``name`` cannot run this problem (empty list: it can)."""
        spec = self.specs.get(name)
        if spec is None:
            return [f"{self.op} has no '{name}' backend (it has: {', '.join(self.specs)})"]
        out = []
        devices = spec.devices + (("cpu",) if name == "triton" and triton_interpreting() else ())
        if device.type not in devices:
            out.append(f"'{name}' runs on {'/'.join(devices)} tensors, got {device.type}")
        if dtype not in spec.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in spec.dtypes)
            out.append(f"'{name}' supports dtypes {names}, got {str(dtype).replace('torch.', '')}")
        why = _availability(self.op, name)
        if why:
            out.append(why)
        why = spec.limits(**problem)
        if why:
            out.append(why)
        return out

    def select(self, backend: str, device: torch.device, dtype: torch.dtype, **problem) -> str:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if backend != "auto":
            why = self.reasons(backend, device, dtype, **problem)
            if why:
                raise BackendUnavailableError(
                    f"{self.op}: backend '{backend}' cannot run these inputs:\n  - "
                    + "\n  - ".join(why)
                )
            return backend
        for spec in self.specs.values():
            auto_devices = spec.auto_devices if spec.auto_devices is not None else spec.devices
            if device.type not in auto_devices:
                continue
            if not self.reasons(spec.name, device, dtype, **problem):
                return spec.name
            if spec.on_skip is not None:
                _skipped(self.op, spec.name)
        raise BackendUnavailableError(
            f"{self.op}: no backend can run {dtype} tensors on {device.type}:\n  - "
            + "\n  - ".join(r for s in self.specs for r in self.reasons(s, device, dtype, **problem))
        )
