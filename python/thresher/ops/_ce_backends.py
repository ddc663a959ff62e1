"""The cross-entropy backends and their autograd: each backend's two row kernels (``KERNELS``:
reference, cpu = thresher._C, triton = thresher.kernels.cross_entropy, cuda = thresher._C_cuda),
the family's one dispatcher (``DISPATCH``), the torch.library custom ops around the kernels
(opaque to torch.compile; fake implementations give it shapes) and the autograd Functions
that fuse the gradient into the forward where they can. Called by ops/cross_entropy.py, which
checks every argument first. How the work is split: docs/kernels.md ("Cross-entropy")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native
from ._ce_reference import FLOAT_DTYPES, acc_dtype, reference_cross_entropy_rows
from ._dispatch import (
    BackendSpec,
    Dispatcher,
    extension_available,
    on_device,
    triton_available,
    triton_module,
)

__all__ = ["KERNELS", "DISPATCH", "WeightedCE", "LinearWeightedCE", "composite_ce",
           "composite_linear_ce"]

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------
# Row kernels of every backend (the contract: docs/kernels.md, "How the work is split")
# ----------------------------------------------------------------------------------------


def _reference_fwd(x, target, coef, grad_out, ii, eps, zl, sc):
    loss, lse, grad = reference_cross_entropy_rows(x, target, coef, ii, eps, zl, sc)
    if grad is not None:
        grad_out.copy_(grad)
    return loss, lse


def _reference_bwd(x, target, lse, coef, grad_out, ii, eps, zl, sc):
    _, _, grad = reference_cross_entropy_rows(x, target, coef, ii, eps, zl, sc, lse=lse)
    grad_out.copy_(grad)


def _native_kernels(ext, last_arg):
    """Row kernels of a pybind11 extension (``thresher._C`` or ``thresher._C_cuda``): both
    take raw pointers, strides and a dtype code; the CPU one ends with a thread count, the
    CUDA one with the current stream (``last_arg(x)``)."""

    def fwd(x, target, coef, grad_out, ii, eps, zl, sc):
        acc = acc_dtype(x.dtype)
        n, v = x.shape
        loss = torch.empty(n, dtype=acc, device=x.device)
        lse = torch.empty(n, dtype=acc, device=x.device)
        if n:
            grad = grad_out if coef is not None else None
            ext().ce_forward(
                x.data_ptr(), n, v, x.stride(0), _native.DTYPE_CODES[x.dtype],
                target.data_ptr(), lse.data_ptr(), loss.data_ptr(), _native.ptr(grad),
                grad.stride(0) if grad is not None else 0, _native.ptr(coef), ii, eps, zl, sc,
                last_arg(x),
            )
        return loss, lse

    def bwd(x, target, lse, coef, grad_out, ii, eps, zl, sc):
        n, v = x.shape
        if n:
            ext().ce_backward(
                x.data_ptr(), n, v, x.stride(0), _native.DTYPE_CODES[x.dtype],
                target.data_ptr(), lse.data_ptr(), coef.data_ptr(), grad_out.data_ptr(),
                grad_out.stride(0), ii, eps, zl, sc, last_arg(x),
            )

    return fwd, bwd


def _triton_module():
    return triton_module("cross_entropy")


def _triton_fwd(x, target, coef, grad_out, ii, eps, zl, sc):
    n = x.size(0)
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        with on_device(x):
            _triton_module().ce_forward(x, target, lse, loss,
                                        grad_out if coef is not None else None, coef, ii, eps, zl,
                                        sc)
    return loss, lse


def _triton_bwd(x, target, lse, coef, grad_out, ii, eps, zl, sc):
    if x.size(0):
        with on_device(x):
            _triton_module().ce_backward(x, target, lse, coef, grad_out, ii, eps, zl, sc)


def _vocab_limit(vocab: int = 1, **_) -> str | None:
    return None if vocab < 2**31 else f"vocab size {vocab} does not fit a 32-bit index"


KERNELS = {
    "reference": (_reference_fwd, _reference_bwd),
    "cpu": _native_kernels(_native.cpu_ext, lambda x: _native.num_threads()),
    "triton": (_triton_fwd, _triton_bwd),
    "cuda": _native_kernels(_native.cuda_ext, _native.cuda_stream),
}

DISPATCH = Dispatcher(
    "weighted_cross_entropy",
    [
        BackendSpec("triton", ("cuda",), GPU_DTYPES, triton_available("cross_entropy"), _vocab_limit),
        BackendSpec("cuda", ("cuda",), GPU_DTYPES, extension_available("_C_cuda"), _vocab_limit),
        BackendSpec("cpu", ("cpu",), FLOAT_DTYPES, extension_available("_C"), _vocab_limit,
                    on_skip=lambda: _native.warn_missing_once("_C")),
        BackendSpec("reference", ("cpu", "cuda"), FLOAT_DTYPES),
        # Never chosen by "auto": the composable path (see composite_ce), for
        # torch.func transforms and higher-order autograd through every intermediate.
        BackendSpec("torch", ("cpu", "cuda"), FLOAT_DTYPES, auto_devices=()),
    ],
)


# ----------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; fake implementations give it shapes)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("thresher::weighted_ce_fwd", mutates_args=())
def _ce_fwd_op(logits: Tensor, target: Tensor, grad_coef: Optional[Tensor], ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, backend: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    fwd, _ = KERNELS[backend]
    grad = logits.new_empty(logits.shape) if grad_coef is not None else logits.new_empty(0)
    loss, lse = fwd(logits, target, grad_coef, grad if grad_coef is not None else None,
                    ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse, grad


@_ce_fwd_op.register_fake
def _(logits, target, grad_coef, ignore_index, label_smoothing, z_loss, softcap, backend):
    acc = acc_dtype(logits.dtype)
    n = logits.size(0)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_coef is not None \
        else logits.new_empty(0)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc), grad


@torch.library.custom_op("thresher::weighted_ce_fwd_overwrite", mutates_args=("logits",))
def _ce_fwd_overwrite_op(logits: Tensor, target: Tensor, grad_coef: Tensor, ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: float, backend: str
                         ) -> tuple[Tensor, Tensor]:
    """The fused forward with the gradient written over ``logits`` (overwrite_logits=True)."""
    fwd, _ = KERNELS[backend]
    return fwd(logits, target, grad_coef, logits, ignore_index, label_smoothing, z_loss, softcap)


@_ce_fwd_overwrite_op.register_fake
def _(logits, target, grad_coef, ignore_index, label_smoothing, z_loss, softcap, backend):
    acc = acc_dtype(logits.dtype)
    n = logits.size(0)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


@torch.library.custom_op("thresher::weighted_ce_bwd", mutates_args=())
def _ce_bwd_op(logits: Tensor, target: Tensor, lse: Tensor, grad_coef: Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, backend: str) -> Tensor:
    _, bwd = KERNELS[backend]
    grad = logits.new_empty(logits.shape)
    bwd(logits, target, lse, grad_coef, grad, ignore_index, label_smoothing, z_loss, softcap)
    return grad


@_ce_bwd_op.register_fake
def _(logits, target, lse, grad_coef, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _linear_chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


def _linear_logits(hidden_chunk, weight, bias, buf):
    """Logits of one chunk written into the reused (chunk_size, V) buffer ``buf``: one
    allocation (and one round of page faults) per call instead of one per chunk. The bias is
    added inside the GEMM (addmm): for 16-bit logits, ``mm`` then ``+= bias`` would round twice."""
    out = buf[: hidden_chunk.size(0)]
    if bias is None:
        return torch.mm(hidden_chunk, weight.t(), out=out)
    return torch.addmm(bias, hidden_chunk, weight.t(), out=out)


def _chunk_buffer(hidden, weight, chunk_size):
    return hidden.new_empty((min(chunk_size, hidden.size(0)), weight.size(0)))


def _linear_grads(z, h, weight, s, e, gh, gw, gb, needs):
    """Accumulates the chunk's contributions, z holding dL/dlogits of rows [s, e)."""
    if needs[0]:
        torch.mm(z, weight, out=gh[s:e])
    if needs[1]:
        if gw.dtype == z.dtype:
            gw.addmm_(z.t(), h)
        else:  # bf16/fp16: the chunk GEMM accumulates in fp32 inside; the sum over chunks too
            gw += (z.t() @ h).to(gw.dtype)
    if needs[2]:
        gb += z.sum(0, dtype=gb.dtype)


def _linear_grad_buffers(hidden, weight, bias, needs):
    empty = hidden.new_empty  # a distinct empty tensor per output: custom-op outputs may not alias
    gh = torch.empty_like(hidden) if needs[0] else empty(0)
    gw = torch.zeros(weight.shape, dtype=acc_dtype(weight.dtype), device=weight.device) \
        if needs[1] else empty(0)
    gb = torch.zeros(bias.shape, dtype=acc_dtype(bias.dtype), device=bias.device) \
        if needs[2] and bias is not None else empty(0)
    return gh, gw, gb


@torch.library.custom_op("thresher::linear_weighted_ce_fwd", mutates_args=())
def _linear_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   grad_coef: Optional[Tensor], needs: list[bool], ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked over tokens: only a (chunk_size, V) logits buffer ever exists. With grad_coef
    the kernel overwrites that buffer with dL/dlogits and two GEMMs turn it into the
    hidden/weight gradients before the next chunk; without it (no_grad) nothing is kept."""
    fwd, _ = KERNELS[backend]
    n = hidden.size(0)
    acc = acc_dtype(hidden.dtype)
    loss = hidden.new_empty(n, dtype=acc)
    lse = hidden.new_empty(n, dtype=acc)
    gh, gw, gb = _linear_grad_buffers(hidden, weight, bias, needs) if grad_coef is not None \
        else tuple(hidden.new_empty(0) for _ in range(3))
    buf = _chunk_buffer(hidden, weight, chunk_size)
    for s, e in _linear_chunks(n, chunk_size):
        h = hidden[s:e]
        z = _linear_logits(h, weight, bias, buf)
        c = grad_coef[s:e] if grad_coef is not None else None
        loss[s:e], lse[s:e] = fwd(z, target[s:e], c, z if c is not None else None,
                                  ignore_index, label_smoothing, z_loss, softcap)
        if c is not None:
            _linear_grads(z, h, weight, s, e, gh, gw, gb, needs)
    return loss, lse, gh, gw, gb


@_linear_fwd_op.register_fake
def _(hidden, weight, bias, target, grad_coef, needs, ignore_index, label_smoothing, z_loss,
      softcap, chunk_size, backend):
    acc = acc_dtype(hidden.dtype)
    n = hidden.size(0)
    grads = _linear_grad_buffers(hidden, weight, bias, needs) if grad_coef is not None \
        else tuple(hidden.new_empty(0) for _ in range(3))
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)) + tuple(grads)


@torch.library.custom_op("thresher::linear_weighted_ce_bwd", mutates_args=())
def _linear_bwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   lse: Tensor, grad_coef: Tensor, needs: list[bool], ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes each logits chunk, turns it into dL/dlogits in place from the saved lse
    (no second log-sum-exp) and accumulates the three gradients."""
    _, bwd = KERNELS[backend]
    gh, gw, gb = _linear_grad_buffers(hidden, weight, bias, needs)
    buf = _chunk_buffer(hidden, weight, chunk_size)
    for s, e in _linear_chunks(hidden.size(0), chunk_size):
        h = hidden[s:e]
        z = _linear_logits(h, weight, bias, buf)
        bwd(z, target[s:e], lse[s:e], grad_coef[s:e], z, ignore_index, label_smoothing, z_loss,
            softcap)
        _linear_grads(z, h, weight, s, e, gh, gw, gb, needs)
    return gh, gw, gb


@_linear_bwd_op.register_fake
def _(hidden, weight, bias, target, lse, grad_coef, needs, ignore_index, label_smoothing, z_loss,
      softcap, chunk_size, backend):
    return _linear_grad_buffers(hidden, weight, bias, needs)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


def composite_ce(logits, target, coef, scalar, fuse, ii, eps, zl, sc, backend, overwrite=False):
    """``backend="torch"``: the same contract as ``WeightedCE.apply`` from plain PyTorch ops,
    so every autograd order and ``torch.func`` (jvp, vmap, grad of grad) works through it."""
    loss, lse, _ = reference_cross_entropy_rows(logits, target, None, ii, eps, zl, sc)
    return ((loss * coef).sum() if scalar else loss), lse.detach()


def composite_linear_ce(hidden, weight, bias, target, coef, scalar, fuse, ii, eps, zl, sc, chunk,
                         backend):
    """``backend="torch"`` for the fused linear op: materialises the (N, V) logits."""
    return composite_ce(torch.nn.functional.linear(hidden, weight, bias), target, coef, scalar,
                        fuse, ii, eps, zl, sc, backend)


def _differentiable_grad(logits, target, row_coef, ii, eps, zl, sc):
    """dL/dlogits from differentiable PyTorch ops (a backward run with create_graph=True):
    the result has a grad_fn through logits and the upstream, so double backward is exact
    whatever backend ran the forward."""
    _, _, grad = reference_cross_entropy_rows(logits, target, row_coef, ii, eps, zl, sc)
    return grad


def _upstream_is_one(g: Tensor, dtype: torch.dtype) -> bool:
    # On the CPU reading a scalar costs nothing. On a GPU it syncs, so for fp32/fp64 (where
    # scaling the fused gradient in place rounds once more at fp32 precision) it is skipped.
    # A 16-bit fused gradient scaled in place would be rounded twice, so there the scalar is
    # read on any device and an upstream other than 1 recomputes instead (_reuse_fused).
    if g.numel() != 1 or (g.device.type != "cpu" and dtype not in (torch.bfloat16, torch.float16)):
        return False
    return float(g) == 1.0


def _reuse_fused(g: Tensor, dtype: torch.dtype, can_recompute: bool) -> bool | None:
    """True: the fused gradient is final; False: scale it by ``g`` in place; None: recompute
    (a 16-bit gradient times an upstream other than 1 would be rounded twice)."""
    if _upstream_is_one(g, dtype):
        return True
    if dtype in (torch.bfloat16, torch.float16) and can_recompute:
        return None
    return False


def _take_fused(ctx):
    """The gradient the forward computed, handed over once: the first backward owns it
    (and may scale it in place); a second backward (retain_graph) recomputes."""
    fused, ctx.fused = ctx.fused, None
    return fused


class WeightedCE(torch.autograd.Function):
    """``scalar=True``: returns ``sum_t coef_t l_t`` and may fuse the gradient into the
    forward (``fuse``); ``scalar=False``: returns the per-token losses ``l``. Both also return
    the per-token lse (no gradient: for return_lse)."""

    @staticmethod
    def forward(ctx, logits, target, coef, scalar, fuse, ii, eps, zl, sc, backend, overwrite=False):
        if fuse and overwrite:
            loss, lse = _ce_fwd_overwrite_op(logits, target, coef, ii, eps, zl, sc, backend)
            # The logits are the gradient now: bump their version so any graph that saved
            # them fails loudly, and keep nothing that a recompute would need.
            torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(None, target, lse, coef)
            ctx.fused = logits
        else:
            loss, lse, grad = _ce_fwd_op(logits, target, coef if fuse else None, ii, eps, zl, sc,
                                         backend)
            ctx.save_for_backward(logits, target, lse, coef)
            ctx.fused = grad if fuse else None
        ctx.cfg = (scalar, ii, eps, zl, sc, backend)
        ctx.mark_non_differentiable(lse)
        return ((loss * coef).sum() if scalar else loss), lse

    @staticmethod
    def backward(ctx, g, _g_lse):
        logits, target, lse, coef = ctx.saved_tensors
        scalar, ii, eps, zl, sc, backend = ctx.cfg
        fused = _take_fused(ctx)
        if logits is None and (fused is None or torch.is_grad_enabled()):
            raise RuntimeError(
                "weighted_cross_entropy(overwrite_logits=True) wrote the gradient over the "
                "logits, so backward can run only once through it and not with "
                "create_graph=True; use overwrite_logits=False to backpropagate twice")
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recompute
            grad = _differentiable_grad(logits, target, coef * g if scalar else g, ii, eps, zl, sc)
        elif fused is not None and (use := _reuse_fused(g, fused.dtype, logits is not None)) \
                is not None:
            grad = fused if use else fused.mul_(g.to(fused.dtype))
        else:
            row_coef = (coef * g if scalar else g).to(lse.dtype).contiguous()
            grad = _ce_bwd_op(logits, target, lse, row_coef, ii, eps, zl, sc, backend)
        return grad, None, None, None, None, None, None, None, None, None, None


class LinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, coef, scalar, fuse, ii, eps, zl, sc, chunk,
                backend):
        needs = list(ctx.needs_input_grad[:3])
        loss, lse, gh, gw, gb = _linear_fwd_op(hidden, weight, bias, target,
                                               coef if fuse else None, needs, ii, eps, zl, sc,
                                               chunk, backend)
        ctx.save_for_backward(hidden, weight, bias, target, lse, coef)
        ctx.fused = (gh, gw, gb) if fuse else None
        ctx.cfg = (scalar, needs, ii, eps, zl, sc, chunk, backend)
        ctx.mark_non_differentiable(lse)
        return ((loss * coef).sum() if scalar else loss), lse

    @staticmethod
    def backward(ctx, g, _g_lse):
        hidden, weight, bias, target, lse, coef = ctx.saved_tensors
        scalar, needs, ii, eps, zl, sc, chunk, backend = ctx.cfg
        fused = _take_fused(ctx)
        if torch.is_grad_enabled():  # create_graph=True: differentiable, materialises (N, V)
            z = torch.nn.functional.linear(hidden, weight, bias)
            gz = _differentiable_grad(z, target, coef * g if scalar else g, ii, eps, zl, sc)
            gh = gz @ weight if needs[0] else None
            gw = gz.t() @ hidden if needs[1] else None
            gb = gz.sum(0) if needs[2] and bias is not None else None
            return gh, gw, gb, None, None, None, None, None, None, None, None, None, None
        use = None if fused is None else _reuse_fused(g, hidden.dtype, True)
        if use is not None:
            if not use:
                fused = tuple(t.mul_(g.to(t.dtype)) for t in fused)
            gh, gw, gb = fused
        else:
            row_coef = (coef * g if scalar else g).to(lse.dtype).contiguous()
            gh, gw, gb = _linear_bwd_op(hidden, weight, bias, target, lse, row_coef, needs,
                                        ii, eps, zl, sc, chunk, backend)
        gh = gh if needs[0] else None
        gw = gw.to(weight.dtype) if needs[1] else None
        gb = gb.to(bias.dtype) if needs[2] and bias is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None
