"""Cross-entropy with per-sample and per-token weights, plain and fused with the LM head:
``weighted_cross_entropy``, ``linear_weighted_cross_entropy`` and their nn.Module forms
(exported from ``thresher.ops`` and ``thresher``), with every argument check.

The op is split by job: this module (public API and checks), ``_ce_reduce`` (weights, class
weights, reductions), ``_ce_backends`` (backends, the one dispatcher ``DISPATCH``, custom ops,
autograd) and ``_ce_reference`` (the PyTorch reference, ``reference_cross_entropy_rows``).
The maths, the reductions, how forward and backward split the work and
``overwrite_logits``: docs/kernels.md ("Cross-entropy"); signatures: docs/interfaces.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from thresher.core.checks import (
    check_choice,
    check_has_data,
    check_range,
    check_tensor,
    check_weights,
    rows_contiguous,
    values_checkable,
)
from thresher.core.constants import IGNORE_INDEX, LOSS_REDUCTIONS

from ._ce_backends import DISPATCH, LinearWeightedCE, WeightedCE, composite_ce, composite_linear_ce
from ._ce_reduce import CrossEntropyOutput, class_weight, rows_dot, run
from ._ce_reference import FLOAT_DTYPES, acc_dtype, reference_cross_entropy_rows

__all__ = [
    "weighted_cross_entropy",
    "linear_weighted_cross_entropy",
    "WeightedCrossEntropyLoss",
    "LinearWeightedCrossEntropyLoss",
    "CrossEntropyOutput",
    "reference_cross_entropy_rows",
]

# Default chunk of the fused linear op: enough rows that the (chunk, V) logits buffer is
# about this many bytes. 128 MiB = 1024 rows at V = 32000 fp32, 256 rows at V = 128256:
# large enough for the GEMMs to run at full speed, small next to the (N, V) it replaces.
LINEAR_CHUNK_BYTES = 128 * 2**20


def _check_common(target, lead_shape, device, vocab, sample_weight, token_weight, ignore_index,
                  reduction, label_smoothing, z_loss, softcap):
    check_choice("reduction", reduction, LOSS_REDUCTIONS)
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
    leading shape). See docs/kernels.md ("Cross-entropy") for the weights and reductions, and for
    ``overwrite_logits`` (write the gradient over the logits: faster, destroys them).
    ``softcap``: logits <- softcap * tanh(logits / softcap) first (Gemma 2/3); None/0: off.
    ``return_lse=True``: a :class:`CrossEntropyOutput` ``(loss, lse, z_loss)`` instead.
    ``weight``: class weights ``(V,)`` as ``F.cross_entropy``'s (see _ce_reduce.class_weight)."""
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
    acc = acc_dtype(logits.dtype)
    # Before the kernel, with ops whose backward keeps no reference to x (indexing, not
    # gather): overwrite_logits=True replaces x with its gradient.
    cw = class_weight(weight, target, ignore_index, vocab, label_smoothing, softcap, acc,
                      lambda wf, y: (x[torch.arange(x.size(0), device=x.device), y].to(acc),
                                     rows_dot(x, wf, acc)))
    target2, tflat = _as_2d_target(target)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return run(
        composite_ce if name == "torch" else WeightedCE.apply, target.shape, target2,
        sample_weight, token_weight, ignore_index, reduction, needs_grad, acc,
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
    acc = acc_dtype(hidden.dtype)

    def linear_terms(wf, y):  # x_y and w.x from the (N, H) hidden states, no (N, V) logits
        hf = h2.to(acc)
        x_y = (hf * w[y].to(acc)).sum(-1)
        wx = hf @ rows_dot(w.t(), wf, acc)
        if bias is not None:
            x_y, wx = x_y + bias[y].to(acc), wx + bias.to(acc) @ wf
        return x_y, wx

    cw = class_weight(weight, target, ignore_index, vocab, label_smoothing, softcap, acc,
                      linear_terms)
    target2, tflat = _as_2d_target(target)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or lm_weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return run(
        composite_linear_ce if name == "torch" else LinearWeightedCE.apply, target.shape, target2,
        sample_weight, token_weight, ignore_index, reduction, needs_grad, acc,
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
        check_choice("reduction", reduction, LOSS_REDUCTIONS)
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
        check_choice("reduction", reduction, LOSS_REDUCTIONS)
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
