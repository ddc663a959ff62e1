"""The backends of the compression ops: each backend's four entry points (``KERNELS``:
reference = ops/_compress_reference.py, cpu = thresher._C, triton = thresher.kernels.compress,
cuda = thresher._C_cuda), the family's one dispatcher (``DISPATCH``, with the GPU kernels'
chunk and block limits) and the torch.library custom ops around them (opaque to
torch.compile; fake implementations give it shapes), which ``call_op`` runs. Called by
ops/compress.py, which checks every argument first. docs/kernels.md ("Compression")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from thresher.core.layouts import QuantLayout, TopKLayout

from . import _native
from ._compress_reference import (
    X_DTYPES,
    reference_quant_decode,
    reference_quant_encode,
    reference_topk_decode,
    reference_topk_encode,
)
from ._dispatch import (
    BackendSpec,
    Dispatcher,
    extension_available,
    on_device,
    triton_available,
    triton_module,
)

__all__ = [
    "KERNELS",
    "GPU_MAX_CHUNK",
    "GPU_MAX_BLOCK",
    "DISPATCH",
    "topk_encode_op",
    "topk_decode_op",
    "quant_encode_op",
    "quant_decode_op",
    "call_op",
]

# ----------------------------------------------------------------------------------------
# Native backends
# ----------------------------------------------------------------------------------------

_SCALING_CODE = {"absmax": 0, "meanstd": 1}


def _cpu_topk_encode(x, error, k, chunk, bits, out):
    _native.cpu_ext().topk_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                  x.numel(), k, chunk, bits, out.data_ptr(), _native.num_threads())


def _cpu_topk_decode(payload, lay, out, count):
    return _native.cpu_ext().topk_decode(payload.data_ptr(), lay.n, lay.k, lay.chunk, lay.bits,
                                         out.data_ptr(), _native.ptr(count), _native.num_threads())


def _cpu_quant_encode(x, error, bits, block, scaling, out):
    _native.cpu_ext().quant_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                   x.numel(), block, bits, _SCALING_CODE[scaling], out.data_ptr(),
                                   _native.num_threads())


def _cpu_quant_decode(payload, lay, out):
    _native.cpu_ext().quant_decode(payload.data_ptr(), lay.n, lay.block, lay.bits,
                                   _SCALING_CODE[lay.scaling], out.data_ptr(), _native.num_threads())


def _cuda_topk_encode(x, error, k, chunk, bits, out):
    with on_device(x):  # the launchers use the current device's stream
        _native.cuda_ext().topk_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                       x.numel(), k, chunk, bits, out.data_ptr(),
                                       _native.cuda_stream(x))


def _cuda_topk_decode(payload, lay, out, count):
    with on_device(out):
        _native.cuda_ext().topk_decode(payload.data_ptr(), lay.n, lay.k, lay.chunk, lay.bits,
                                       out.data_ptr(), _native.ptr(count),
                                       _native.cuda_stream(out))
    return 0  # out-of-chunk indices are skipped on the GPU, not counted (no host sync)


def _cuda_quant_encode(x, error, bits, block, scaling, out):
    with on_device(x):
        _native.cuda_ext().quant_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                        x.numel(), block, bits, _SCALING_CODE[scaling],
                                        out.data_ptr(), _native.cuda_stream(x))


def _cuda_quant_decode(payload, lay, out):
    with on_device(out):
        _native.cuda_ext().quant_decode(payload.data_ptr(), lay.n, lay.block, lay.bits,
                                        _SCALING_CODE[lay.scaling], out.data_ptr(),
                                        _native.cuda_stream(out))


def _triton_module():
    return triton_module("compress")


def _triton_topk_encode(x, error, k, chunk, bits, out):
    with on_device(x):
        _triton_module().topk_encode(x, error, k, chunk, bits, out)


def _triton_topk_decode(payload, lay, out, count):
    with on_device(out):
        _triton_module().topk_decode(payload, lay.n, lay.k, lay.chunk, lay.bits, out, count)
    return 0


def _triton_quant_encode(x, error, bits, block, scaling, out):
    with on_device(x):
        _triton_module().quant_encode(x, error, bits, block, scaling, out)


def _triton_quant_decode(payload, lay, out):
    with on_device(out):
        _triton_module().quant_decode(payload, lay.n, lay.block, lay.bits, lay.scaling, out)


KERNELS = {
    "reference": (lambda x, e, k, c, b, o: o.copy_(reference_topk_encode(x, e, k, c, b)),
                  reference_topk_decode,
                  lambda x, e, b, blk, s, o: o.copy_(reference_quant_encode(x, e, b, blk, s)),
                  reference_quant_decode),
    "cpu": (_cpu_topk_encode, _cpu_topk_decode, _cpu_quant_encode, _cpu_quant_decode),
    "cuda": (_cuda_topk_encode, _cuda_topk_decode, _cuda_quant_encode, _cuda_quant_decode),
    "triton": (_triton_topk_encode, _triton_topk_decode, _triton_quant_encode, _triton_quant_decode),
}


# The GPU kernels hold a chunk (top-k) / block (quantiser) on chip: csrc/cuda/compress.cu and
# kernels/compress.py say why these sizes.
GPU_MAX_CHUNK = 8192
GPU_MAX_BLOCK = 4096


def _gpu_limits(chunk: int = 1, block: int = 1, **_) -> str | None:
    if chunk > GPU_MAX_CHUNK:
        return f"chunk {chunk} > {GPU_MAX_CHUNK} (the GPU kernels keep a chunk on chip)"
    if block > GPU_MAX_BLOCK:
        return f"block {block} > {GPU_MAX_BLOCK} (the GPU kernels keep a block on chip)"
    return None


DISPATCH = Dispatcher(
    "compress",
    [
        BackendSpec("cuda", ("cuda",), X_DTYPES, extension_available("_C_cuda"), _gpu_limits),
        BackendSpec("triton", ("cuda",), X_DTYPES, triton_available("compress"), _gpu_limits),
        BackendSpec("cpu", ("cpu",), X_DTYPES, extension_available("_C"),
                    on_skip=lambda: _native.warn_missing_once("_C")),
        BackendSpec("reference", ("cpu", "cuda"), X_DTYPES),
    ],
)


# ----------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; fake implementations give it shapes)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("thresher::topk_encode", mutates_args=("error",))
def topk_encode_op(x: Tensor, error: Optional[Tensor], k: int, chunk: int, bits: int,
                    backend: str) -> Tensor:
    out = torch.empty(TopKLayout(x.numel(), k, chunk, bits).total, dtype=torch.uint8,
                      device=x.device)
    if out.numel():
        KERNELS[backend][0](x, error, k, chunk, bits, out)
    return out


@topk_encode_op.register_fake
def _(x, error, k, chunk, bits, backend):
    return x.new_empty(TopKLayout(x.numel(), k, chunk, bits).total, dtype=torch.uint8)


@torch.library.custom_op("thresher::topk_decode_add", mutates_args=("out", "count"))
def topk_decode_op(payload: Tensor, out: Tensor, count: Optional[Tensor], k: int, chunk: int,
                    bits: int, backend: str) -> Tensor:
    """out += decoded (count += 1 where a value landed); returns the number of out-of-chunk
    indices found (skipped), as a 0-d int64 tensor."""
    lay = TopKLayout(out.numel(), k, chunk, bits)
    bad = KERNELS[backend][1](payload, lay, out, count) if lay.n_chunks else 0
    return torch.tensor(bad, dtype=torch.int64)


@topk_decode_op.register_fake
def _(payload, out, count, k, chunk, bits, backend):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("thresher::quant_encode", mutates_args=("error",))
def quant_encode_op(x: Tensor, error: Optional[Tensor], bits: int, block: int, scaling: str,
                     backend: str) -> Tensor:
    out = torch.empty(QuantLayout(x.numel(), block, bits, scaling).total, dtype=torch.uint8,
                      device=x.device)
    if out.numel():
        KERNELS[backend][2](x, error, bits, block, scaling, out)
    return out


@quant_encode_op.register_fake
def _(x, error, bits, block, scaling, backend):
    return x.new_empty(QuantLayout(x.numel(), block, bits, scaling).total, dtype=torch.uint8)


@torch.library.custom_op("thresher::quant_decode_add", mutates_args=("out",))
def quant_decode_op(payload: Tensor, out: Tensor, bits: int, block: int, scaling: str,
                     backend: str) -> None:
    lay = QuantLayout(out.numel(), block, bits, scaling)
    if lay.n_blocks:
        KERNELS[backend][3](payload, lay, out)


@quant_decode_op.register_fake
def _(payload, out, bits, block, scaling, backend):
    return None


def _plain(*ts) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the dispatch-stack query
        return False
    return (torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) is torch.Tensor for t in ts))


def call_op(op, *args):
    """Runs a custom op; plain eager calls (no tracing, no fake/functional tensors, no
    dispatch mode) go straight to its implementation: the ops have no autograd formula, so
    the dispatcher adds nothing there but its per-call overhead and, on the first call in a
    process, an import of torch._dynamo (seconds on a loaded machine) -- which every spawned
    rank of a distributed job would pay."""
    if _plain(*(a for a in args if isinstance(a, torch.Tensor) or a is None)):
        return op._init_fn(*args)
    return op(*args)
