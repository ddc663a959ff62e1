"""Cross-entropy with per-sample and per-token weights, plain and fused with the LM head.

Public API (exported from ``thresher.ops`` and ``thresher``)::

    weighted_cross_entropy(logits, target, *, sample_weight=None, token_weight=None,
        ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
        softcap=None, weight=None, overwrite_logits=False, return_lse=False, backend="auto")
    linear_weighted_cross_entropy(hidden, lm_weight, target, *, bias=None, sample_weight=None,
        token_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
        z_loss=0.0, softcap=None, weight=None, chunk_size=None, return_lse=False,
        backend="auto")

(``weight``: class weights as F.cross_entropy's, label smoothing included; ``return_lse``: a
``CrossEntropyOutput(loss, lse, z_loss)``; ``backend="torch"``: the composable path.)

Per token t with logits x (vocab V; soft-capped first when ``softcap=c`` is given:
x <- c tanh(x / c), after the LM head's bias, as Gemma 2/3 do), lse = logsumexp(x),
smoothing eps and z-loss zl::

    l_t = (1 - eps) (lse - x_y) + eps (lse - mean_j x_j) + zl lse^2     (0 where ignored)

(``eps`` as ``F.cross_entropy(label_smoothing=eps)``; ``zl`` as PaLM's z-loss). With the
per-token weight ``w_t = sample_weight[b] * token_weight[b, t]`` (0 where ignored):

* ``"none"``:   ``w_t l_t``, shaped like ``target``;
* ``"sample"``: ``sample_weight[b] * sum_t tw_t l_t / sum_t tw_t`` over the sequence's
  non-ignored tokens, shape ``(B,)`` (0 for a sequence with no such token) -- the scoring
  primitive every selector uses; for 2-D logits each row is its own sequence;
* ``"sum"``:    ``sum_t w_t l_t``;
* ``"mean"``:   ``sum_t w_t l_t / sum_t w_t`` (0, not NaN, when every token is ignored).

Losses are returned in float32 (float64 for float64 inputs) whatever the logits dtype.

How the work is split. Every backend implements two row kernels with one contract:

* ``fwd(x, target, coef | None, grad_out | None) -> (loss, lse)``: per-row loss and lse; when
  ``coef`` is given it also writes ``coef_t * dl_t/dx`` into ``grad_out`` (which may alias
  ``x``: the fused linear op overwrites its logits chunk with the gradient);
* ``bwd(x, target, lse, coef, grad_out)``: the same gradient from the saved lse.

For ``"sum"``/``"mean"`` the upstream gradient is a scalar, so (in eager mode) the forward
computes the gradient in the same sweep that computes the loss -- one read of the logits and
one write of the gradient for forward+backward -- and the backward only scales it by the
upstream scalar (skipped when it is 1). For ``"none"``/``"sample"`` the upstream gradient is
per row and is folded into ``coef`` of a recomputing backward. Under ``torch.compile`` the
graph is kept functional: forward and backward are separate custom ops. A backward run with
grad mode on (``create_graph=True``) ignores the fused gradient and recomputes it through
differentiable PyTorch ops, so double backward is exact whichever backend ran the forward;
``backend="torch"`` builds the whole loss from such ops (for ``torch.func``).

``overwrite_logits=True`` (``"sum"``/``"mean"`` only, the Liger-Kernel convention) writes that
gradient over the logits instead of into a new buffer. For N=4096, V=32000 fp32 the new buffer
is 500 MiB whose first touch costs ~128k page faults -- about as long as the whole kernel on a
2-core CPU -- so this is the fastest way to use ``weighted_cross_entropy`` when the logits are
dead after the loss (the usual training step). The logits then hold the gradient; their
version counter is bumped, so an autograd graph that saved them (``exp``, ``sigmoid``, ...)
refuses to run backward instead of using them silently, and a second backward through this op
(``retain_graph``) raises. ``linear_weighted_cross_entropy`` never needs this: its chunk
buffer is reused and its logits never reach the caller.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _native
from ._dispatch import (
    BackendSpec,
    Dispatcher,
    extension_available,
    on_device,
    triton_available,
    triton_module,
)
from thresher.core.checks import (
    IGNORE_INDEX,
    check_choice,
    check_has_data,
    check_range,
    check_tensor,
    check_weights,
    rows_contiguous,
    values_checkable,
)

__all__ = [
    "weighted_cross_entropy",
    "linear_weighted_cross_entropy",
    "WeightedCrossEntropyLoss",
    "LinearWeightedCrossEntropyLoss",
    "CrossEntropyOutput",
    "reference_cross_entropy_rows",
]

REDUCTIONS = ("none", "sample", "sum", "mean")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Default chunk of the fused linear op: enough rows that the (chunk, V) logits buffer is
# about this many bytes. 128 MiB = 1024 rows at V = 32000 fp32, 256 rows at V = 128256:
# large enough for the GEMMs to run at full speed, small next to the (N, V) it replaces.
LINEAR_CHUNK_BYTES = 128 * 2**20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Reference backend (plain PyTorch; the ground the other backends are tested against)
# ----------------------------------------------------------------------------------------


def _softcap(xf, cap):
    return xf if not cap else cap * torch.tanh(xf / cap)


def reference_cross_entropy_rows(x, target, coef, ignore_index, eps, zl, sc=0.0, lse=None):
    """Reference row kernel. Returns ``(loss, lse, grad)``; ``grad`` is None unless ``coef``
    is given. Passing ``lse`` skips its computation (the backward). ``sc``: soft-cap (0 off).
    Plain differentiable PyTorch ops throughout (the double-backward path uses it)."""
    acc = _acc_dtype(x.dtype)
    xf = _softcap(x.to(acc), sc)
    valid = target != ignore_index
    # A target outside [0, V) gets a NaN loss and no target term, as in the kernels (it is
    # rejected before any kernel runs, except inside a torch.compile graph).
    in_range = (target >= 0) & (target < x.size(-1))
    tgt = torch.where(valid & in_range, target, torch.zeros_like(target))
    if lse is None:
        lse = torch.logsumexp(xf, dim=-1) if x.size(-1) else xf.new_full((x.size(0),), -math.inf)
        lse = torch.where(valid, lse, torch.zeros_like(lse))
    x_t = xf.gather(1, tgt[:, None]).squeeze(1)
    loss = lse - (1 - eps) * x_t + zl * lse * lse
    if eps:
        loss = loss - eps * xf.mean(-1)
    loss = torch.where(in_range, loss, torch.full_like(loss, math.nan))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    grad = None
    if coef is not None:
        g = torch.exp(xf - lse[:, None]) * (1 + 2 * zl * lse)[:, None] - eps / x.size(-1)
        shift = torch.where(in_range, torch.full_like(x_t, -(1 - eps)), torch.zeros_like(x_t))
        g.scatter_add_(1, tgt[:, None], shift[:, None])
        g = torch.where(valid[:, None], g * coef.to(acc)[:, None], torch.zeros_like(g))
        if sc:
            g = g * (1 - (xf / sc) ** 2)
        grad = g.to(x.dtype)
    return loss, lse, grad


def _reference_fwd(x, target, coef, grad_out, ii, eps, zl, sc):
    loss, lse, grad = reference_cross_entropy_rows(x, target, coef, ii, eps, zl, sc)
    if grad is not None:
        grad_out.copy_(grad)
    return loss, lse


def _reference_bwd(x, target, lse, coef, grad_out, ii, eps, zl, sc):
    _, _, grad = reference_cross_entropy_rows(x, target, coef, ii, eps, zl, sc, lse=lse)
    grad_out.copy_(grad)


# ----------------------------------------------------------------------------------------
# Native backends: C++ (thresher._C), Triton (thresher.kernels), CUDA (thresher._C_cuda)
# ----------------------------------------------------------------------------------------


def _native_kernels(ext, last_arg):
    """Row kernels of a pybind11 extension (``thresher._C`` or ``thresher._C_cuda``): both
    take raw pointers, strides and a dtype code; the CPU one ends with a thread count, the
    CUDA one with the current stream (``last_arg(x)``)."""

    def fwd(x, target, coef, grad_out, ii, eps, zl, sc):
        acc = _acc_dtype(x.dtype)
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


_KERNELS = {
    "reference": (_reference_fwd, _reference_bwd),
    "cpu": _native_kernels(_native.cpu_ext, lambda x: _native.num_threads()),
    "triton": (_triton_fwd, _triton_bwd),
    "cuda": _native_kernels(_native.cuda_ext, lambda x: torch.cuda.current_stream(x.device).cuda_stream),
}

DISPATCH = Dispatcher(
    "weighted_cross_entropy",
    [
        BackendSpec("triton", ("cuda",), GPU_DTYPES, triton_available("cross_entropy"), _vocab_limit),
        BackendSpec("cuda", ("cuda",), GPU_DTYPES, extension_available("_C_cuda"), _vocab_limit),
        BackendSpec("cpu", ("cpu",), FLOAT_DTYPES, extension_available("_C"), _vocab_limit,
                    on_skip=lambda: _native.warn_missing_once("_C")),
        BackendSpec("reference", ("cpu", "cuda"), FLOAT_DTYPES),
        # Never chosen by "auto": the composable path (see _composite_ce), for
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
    fwd, _ = _KERNELS[backend]
    grad = logits.new_empty(logits.shape) if grad_coef is not None else logits.new_empty(0)
    loss, lse = fwd(logits, target, grad_coef, grad if grad_coef is not None else None,
                    ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse, grad


@_ce_fwd_op.register_fake
def _(logits, target, grad_coef, ignore_index, label_smoothing, z_loss, softcap, backend):
    acc = _acc_dtype(logits.dtype)
    n = logits.size(0)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_coef is not None \
        else logits.new_empty(0)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc), grad


@torch.library.custom_op("thresher::weighted_ce_fwd_overwrite", mutates_args=("logits",))
def _ce_fwd_overwrite_op(logits: Tensor, target: Tensor, grad_coef: Tensor, ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: float, backend: str
                         ) -> tuple[Tensor, Tensor]:
    """The fused forward with the gradient written over ``logits`` (overwrite_logits=True)."""
    fwd, _ = _KERNELS[backend]
    return fwd(logits, target, grad_coef, logits, ignore_index, label_smoothing, z_loss, softcap)


@_ce_fwd_overwrite_op.register_fake
def _(logits, target, grad_coef, ignore_index, label_smoothing, z_loss, softcap, backend):
    acc = _acc_dtype(logits.dtype)
    n = logits.size(0)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


@torch.library.custom_op("thresher::weighted_ce_bwd", mutates_args=())
def _ce_bwd_op(logits: Tensor, target: Tensor, lse: Tensor, grad_coef: Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, backend: str) -> Tensor:
    _, bwd = _KERNELS[backend]
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
    gw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) \
        if needs[1] else empty(0)
    gb = torch.zeros(bias.shape, dtype=_acc_dtype(bias.dtype), device=bias.device) \
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
    fwd, _ = _KERNELS[backend]
    n = hidden.size(0)
    acc = _acc_dtype(hidden.dtype)
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
    acc = _acc_dtype(hidden.dtype)
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
    _, bwd = _KERNELS[backend]
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


def _composite_ce(logits, target, coef, scalar, fuse, ii, eps, zl, sc, backend, overwrite=False):
    """``backend="torch"``: the same contract as ``_WeightedCE.apply`` from plain PyTorch ops,
    so every autograd order and ``torch.func`` (jvp, vmap, grad of grad) works through it."""
    loss, lse, _ = reference_cross_entropy_rows(logits, target, None, ii, eps, zl, sc)
    return ((loss * coef).sum() if scalar else loss), lse.detach()


def _composite_linear_ce(hidden, weight, bias, target, coef, scalar, fuse, ii, eps, zl, sc, chunk,
                         backend):
    """``backend="torch"`` for the fused linear op: materialises the (N, V) logits."""
    return _composite_ce(torch.nn.functional.linear(hidden, weight, bias), target, coef, scalar,
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


class _WeightedCE(torch.autograd.Function):
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


class _LinearWeightedCE(torch.autograd.Function):
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


# ----------------------------------------------------------------------------------------
# Validation, weights and reductions (shared by both public functions)
# ----------------------------------------------------------------------------------------


def _check_common(target, lead_shape, device, vocab, sample_weight, token_weight, ignore_index,
                  reduction, label_smoothing, z_loss, softcap):
    check_choice("reduction", reduction, REDUCTIONS)
    if softcap is not None:  # None or 0: off
        check_range("softcap", softcap, 0.0, math.inf, finite=True)
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    check_range("z_loss", z_loss, 0.0, math.inf, finite=True)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), device=device,
                 shape=lead_shape)
    if vocab < 1:
        raise ValueError(f"the vocabulary dimension must be at least 1, got {vocab}")
    t = target.reshape(-1)
    if t.numel() and values_checkable():
        bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"target values must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                f"found {int(t[bad][0])}"
            )
    batch = lead_shape[0]
    if sample_weight is not None:
        check_tensor("sample_weight", sample_weight, device=device, shape=(batch,),
                     dtypes=FLOAT_DTYPES)
        check_weights("sample_weight", sample_weight)
    if token_weight is not None:
        check_tensor("token_weight", token_weight, device=device, shape=lead_shape,
                     dtypes=FLOAT_DTYPES)
        check_weights("token_weight", token_weight)


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


class _ClassWeight(NamedTuple):
    """Class weights resolved per token (flat, accumulation dtype): ``wy = weight[y_t]`` (the
    "mean"/"sample" normaliser's weight, as F.cross_entropy's) and ``gain`` (what scales the
    kernel's per-token loss), plus ``linear``: the smoothing correction (None without it)."""

    wy: Tensor
    gain: Tensor
    linear: Optional[Tensor]


def _class_weight(weight, target, ignore_index, vocab, label_smoothing, softcap, acc,
                  linear_terms):
    """``weight`` (per class, as ``F.cross_entropy``'s) per token. F.cross_entropy's loss is
    ``(1 - eps) w_y (lse - x_y) + eps/V sum_j w_j (lse - x_j)`` with the "mean" normaliser
    ``sum_t w_{y_t}``. That equals ``a_t (lse - x_y) + eps/V (W x_y - w.x)`` with
    ``a_t = (1 - eps) w_y + eps W / V`` (``W = sum_j w_j``): the kernels' unsmoothed loss
    scaled by ``a_t`` plus a term linear in the logits (a GEMV), whose exact gradient
    autograd gives -- so every backend runs the same kernels, with eps = 0. ``a_t`` is the
    class weight expected under the smoothed target, which is also what scales the z-loss
    (``w_y`` without smoothing, as before). ``linear_terms(wf, y)`` returns
    ``(x_y, w.x)`` per token for that correction (docs/cross_entropy_class_weights.md).
    Returns None without ``weight``."""
    if weight is None:
        return None
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=target.device,
                 shape=(vocab,))
    check_weights("weight", weight)
    if label_smoothing and softcap:
        raise NotImplementedError(
            "weight= (class weights) with label_smoothing > 0 and softcap is not supported: "
            "the smoothing term would need every soft-capped logit; drop one of the three")
    t = target.reshape(-1).to(torch.int64)
    valid = t != ignore_index
    y = torch.where(valid, t, torch.zeros_like(t)).clamp(0, vocab - 1)
    wf = weight.to(acc)
    wy = wf[y]
    if not label_smoothing:
        return _ClassWeight(wy, wy, None)
    eps = float(label_smoothing)
    W = wf.sum()
    x_y, wx = linear_terms(wf, y)
    lin = (eps / vocab) * (W * x_y - wx)
    return _ClassWeight(wy, (1 - eps) * wy + (eps / vocab) * W,
                        torch.where(valid, lin, torch.zeros_like(lin)))


def _rows_dot(x, v, acc):
    """``x @ v`` accumulated and returned in ``acc``: a 16-bit ``x`` is converted ~64 MiB at a
    time, so no fp32 copy of it exists (and the backward needs only ``v``)."""
    if x.dtype == acc or not x.size(0):
        return x.to(acc) @ v
    return torch.cat([c.to(acc) @ v for c in x.split(max(1, 2**24 // max(1, x.size(1))))])


def _weights(target2, sample_weight, token_weight, ignore_index, acc):
    """Per-token weights (B, T): sample_weight[b] * token_weight[b, t], 0 where ignored.
    Also returns the token-only weights used by the "sample" reduction."""
    tw = (target2 != ignore_index).to(acc)
    if token_weight is not None:
        tw = tw * token_weight.reshape(tw.shape).to(acc)
    w = tw if sample_weight is None else tw * sample_weight.to(acc)[:, None]
    return w, tw


def _normalised(w, den=None, dim=None):
    """``w / den.sum(dim)`` (``den`` defaults to ``w``; 0 where every ``den`` is 0) without
    overflow or underflow: scaled by the largest ``den`` first, so the sum is in [1, n] (a
    float32 sum of weights >= 3.4e38 is inf, one of subnormal weights loses their digits)."""
    if w.numel() == 0:
        return w
    den = w if den is None else den
    kw = {} if dim is None else dict(dim=dim, keepdim=True)
    m = den.amax(**kw)
    m = torch.where(m > 0, m, torch.ones_like(m))
    total = (den / m).sum(**kw)
    out = (w / m) / total.clamp_min(1.0)  # the sum is >= 1 unless every den is 0
    return out if den is w else torch.where(total > 0, out, torch.zeros_like(out))


class CrossEntropyOutput(NamedTuple):
    """What ``return_lse=True`` returns: ``loss`` (as without it), ``lse`` (the per-token
    log-sum-exp of the (soft-capped) logits, ``target``'s shape, 0 where ignored) and
    ``z_loss`` (the z-loss part of ``loss``, ``z_loss * lse^2`` reduced like it). ``lse`` and
    ``z_loss`` carry no gradient: they are for logging."""

    loss: Tensor
    lse: Tensor
    z_loss: Tensor


def _reduce(rows, w, tw, nw, ntw, sample_weight, reduction, target_shape, acc):
    """``rows`` (per-token values, flat) reduced with the weights (see the module docstring);
    ``nw``/``ntw``: the normalisers' weights ("mean"/"sample"), ``w``/``tw`` times the class
    weight of the target."""
    if reduction in ("sum", "mean"):
        coef = w.reshape(-1)
        return (rows * (_normalised(coef, nw.reshape(-1)) if reduction == "mean" else coef)).sum()
    rows = rows.reshape(tw.shape)
    if reduction == "none":
        return (rows * w).reshape(target_shape)
    per_seq = (rows * _normalised(tw, ntw, 1)).sum(1)
    return per_seq if sample_weight is None else per_seq * sample_weight.to(acc)


def _run(fn, target_shape, target2, sample_weight, token_weight, ignore_index, reduction,
         needs_grad, acc, make_args, zl, return_lse, cw):
    """Applies the reduction around ``fn`` (a _WeightedCE / _LinearWeightedCE apply); ``cw``:
    the class weights per token (a _ClassWeight) or None."""
    w, tw = _weights(target2, sample_weight, token_weight, ignore_index, acc)
    nw, ntw = (w, tw) if cw is None else (w * cw.wy.reshape(w.shape), tw * cw.wy.reshape(w.shape))
    reduce = lambda rows: _reduce(rows, w, tw, nw, ntw, sample_weight, reduction,  # noqa: E731
                                  target_shape, acc)
    gain = None if cw is None else cw.gain
    coef = w.reshape(-1)
    if reduction in ("sum", "mean") and not coef.requires_grad and \
            (gain is None or not gain.requires_grad):
        # the weighting inside the op, which may then fuse the gradient into the forward
        num = coef if gain is None else coef * gain
        scale = (lambda c: _normalised(c, nw.reshape(-1))) if reduction == "mean" \
            else (lambda c: c)
        fuse = needs_grad and not torch.compiler.is_compiling()
        loss, lse = fn(*make_args(scale(num).contiguous(), True, fuse))
        if cw is not None and cw.linear is not None:
            loss = loss + (cw.linear * scale(coef)).sum()
    else:  # per-token losses (also sum/mean with differentiable weights), reduced here
        rows, lse = fn(*make_args(w.new_ones(()), False, False))
        if gain is not None:
            rows = rows * gain
        if cw is not None and cw.linear is not None:
            rows = rows + cw.linear
        loss = reduce(rows)
    if not return_lse:
        return loss
    zrows = zl * lse * lse
    return CrossEntropyOutput(loss, lse.reshape(target_shape),
                              reduce(zrows if gain is None else zrows * gain).detach())


def _as_2d_target(target):
    t2 = target.reshape(-1, 1) if target.dim() == 1 else target
    return t2, t2.reshape(-1).to(torch.int64).contiguous()


def weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    sample_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    weight: Tensor | None = None,
    overwrite_logits: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | CrossEntropyOutput:
    """Weighted cross-entropy of ``logits (B, T, V)`` or ``(N, V)`` against ``target`` (the
    leading shape). See the module docstring for the weights and reductions, and for
    ``overwrite_logits`` (write the gradient over the logits: faster, destroys them).
    ``softcap``: logits <- softcap * tanh(logits / softcap) first (Gemma 2/3); None/0: off.
    ``return_lse=True``: a :class:`CrossEntropyOutput` ``(loss, lse, z_loss)`` instead.
    ``weight``: class weights ``(V,)`` as ``F.cross_entropy``'s (see _class_weight)."""
    _check_flag("return_lse", return_lse)
    check_tensor("logits", logits, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_has_data("logits", logits)
    vocab = logits.size(-1)
    _check_common(target, tuple(logits.shape[:-1]), logits.device, vocab, sample_weight,
                  token_weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_flag("overwrite_logits", overwrite_logits)
    if overwrite_logits and reduction not in ("sum", "mean"):
        raise ValueError(f"overwrite_logits=True needs reduction 'sum' or 'mean' (a scalar loss "
                         f"whose gradient the forward computes), got reduction={reduction!r}")
    name = DISPATCH.select(backend, logits.device, logits.dtype, vocab=vocab)
    x = rows_contiguous(logits.reshape(-1, vocab))
    acc = _acc_dtype(logits.dtype)
    # Before the kernel, with ops whose backward keeps no reference to x (indexing, not
    # gather): overwrite_logits=True replaces x with its gradient.
    cw = _class_weight(weight, target, ignore_index, vocab, label_smoothing, softcap, acc,
                       lambda wf, y: (x[torch.arange(x.size(0), device=x.device), y].to(acc),
                                         _rows_dot(x, wf, acc)))
    target2, tflat = _as_2d_target(target)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return _run(
        _composite_ce if name == "torch" else _WeightedCE.apply, target.shape, target2, sample_weight, token_weight, ignore_index,
        reduction, needs_grad, _acc_dtype(logits.dtype),
        lambda coef, scalar, fuse: (x, tflat, coef, scalar, fuse, ignore_index,
                                    0.0 if cw is not None else float(label_smoothing),  # see cw
                                    float(z_loss),
                                    float(softcap or 0.0), name, overwrite_logits),
        float(z_loss), return_lse, cw,
    )


def linear_weighted_cross_entropy(
    hidden: Tensor,
    lm_weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    sample_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    weight: Tensor | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | CrossEntropyOutput:
    """``weighted_cross_entropy(hidden @ lm_weight.T + bias, target, ...)`` without ever
    materialising the ``(N, V)`` logits: peak extra memory is one ``(chunk_size, V)``
    buffer (default: about 128 MiB worth of rows, see ``LINEAR_CHUNK_BYTES``) plus an fp32
    ``lm_weight``-sized gradient accumulator. Under ``torch.no_grad()`` nothing is kept.
    ``softcap`` is applied after the bias, as in :func:`weighted_cross_entropy`;
    ``return_lse`` too."""
    _check_flag("return_lse", return_lse)
    check_tensor("hidden", hidden, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_has_data("hidden", hidden)
    H = hidden.size(-1)
    check_tensor("lm_weight", lm_weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device,
                 shape=(None, H))
    vocab = lm_weight.size(0)
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), device=hidden.device, shape=(vocab,))
    _check_common(target, tuple(hidden.shape[:-1]), hidden.device, vocab, sample_weight,
                  token_weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    n = math.prod(hidden.shape[:-1])  # (not numel // H: H may be 0, logits = bias or 0)
    if chunk_size is None:
        chunk_size = LINEAR_CHUNK_BYTES // max(1, vocab * hidden.element_size())
        chunk_size = max(16, 1 << max(0, chunk_size.bit_length() - 1))
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk_size = max(1, min(chunk_size, n))
    name = DISPATCH.select(backend, hidden.device, hidden.dtype, vocab=vocab)
    h2 = hidden.reshape(n, H).contiguous()
    w = lm_weight.contiguous()
    acc = _acc_dtype(hidden.dtype)

    def linear_terms(wf, y):  # x_y and w.x from the (N, H) hidden states, no (N, V) logits
        hf = h2.to(acc)
        x_y = (hf * w[y].to(acc)).sum(-1)
        wx = hf @ _rows_dot(w.t(), wf, acc)
        if bias is not None:
            x_y, wx = x_y + bias[y].to(acc), wx + bias.to(acc) @ wf
        return x_y, wx

    cw = _class_weight(weight, target, ignore_index, vocab, label_smoothing, softcap, acc,
                       linear_terms)
    target2, tflat = _as_2d_target(target)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or lm_weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _run(
        _composite_linear_ce if name == "torch" else _LinearWeightedCE.apply, target.shape, target2, sample_weight, token_weight, ignore_index,
        reduction, needs_grad, _acc_dtype(hidden.dtype),
        lambda coef, scalar, fuse: (h2, w, bias, tflat, coef, scalar, fuse, ignore_index,
                                    0.0 if cw is not None else float(label_smoothing),  # see cw
                                    float(z_loss),
                                    float(softcap or 0.0), chunk_size, name),
        float(z_loss), return_lse, cw,
    )


class WeightedCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`weighted_cross_entropy` (configuration only, no parameters)."""

    def __init__(self, *, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, weight=None, overwrite_logits=False, backend="auto"):
        super().__init__()
        self.register_buffer("weight", weight)  # class weights: moved by .to(device)
        check_choice("reduction", reduction, REDUCTIONS)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.backend = label_smoothing, z_loss, backend
        self.softcap = softcap
        self.overwrite_logits = overwrite_logits

    def forward(self, logits, target, sample_weight=None, token_weight=None):
        return weighted_cross_entropy(
            logits, target, sample_weight=sample_weight, token_weight=token_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            weight=self.weight, overwrite_logits=self.overwrite_logits, backend=self.backend)

    def extra_repr(self):
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, overwrite_logits={self.overwrite_logits}, backend={self.backend!r}")


class LinearWeightedCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_weighted_cross_entropy`; takes the LM head's weight
    (and bias) at call time so it can sit behind any model's final hidden states."""

    def __init__(self, *, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, weight=None, chunk_size=None, backend="auto"):
        super().__init__()
        self.register_buffer("weight", weight)
        check_choice("reduction", reduction, REDUCTIONS)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, hidden, lm_weight, target, bias=None, sample_weight=None, token_weight=None):
        return linear_weighted_cross_entropy(
            hidden, lm_weight, target, bias=bias, sample_weight=sample_weight,
            token_weight=token_weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            weight=self.weight, chunk_size=self.chunk_size,
            backend=self.backend)

    def extra_repr(self):
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}, backend={self.backend!r}")
