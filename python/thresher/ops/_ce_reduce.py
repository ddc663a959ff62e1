"""The weighting and reductions around the cross-entropy kernels, shared by both public
functions: per-token weights (sample x token, 0 where ignored), class weights resolved per
token (docs/cross_entropy_class_weights.md), the overflow-safe normalisers and ``run``,
which applies the reduction around a kernel call and fuses the weights into it where the
gradient allows. The reductions: docs/kernels.md ("Cross-entropy")."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from thresher.core.checks import check_tensor, check_weights

from ._ce_reference import FLOAT_DTYPES

__all__ = ["CrossEntropyOutput", "ClassWeight", "class_weight", "rows_dot", "run"]


class ClassWeight(NamedTuple):
    """Class weights resolved per token (flat, accumulation dtype): ``wy = weight[y_t]`` (the
    "mean"/"sample" normaliser's weight, as F.cross_entropy's) and ``gain`` (what scales the
    kernel's per-token loss), plus ``linear``: the smoothing correction (None without it)."""

    wy: Tensor
    gain: Tensor
    linear: Optional[Tensor]


def class_weight(weight, target, ignore_index, vocab, label_smoothing, softcap, acc,
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
        return ClassWeight(wy, wy, None)
    eps = float(label_smoothing)
    W = wf.sum()
    x_y, wx = linear_terms(wf, y)
    lin = (eps / vocab) * (W * x_y - wx)
    return ClassWeight(wy, (1 - eps) * wy + (eps / vocab) * W,
                        torch.where(valid, lin, torch.zeros_like(lin)))


def rows_dot(x, v, acc):
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
    """``rows`` (per-token values, flat) reduced with the weights (docs/kernels.md, "What it
    computes"); ``nw``/``ntw``: the normalisers' weights ("mean"/"sample"), ``w``/``tw`` times
    the class weight of the target."""
    if reduction in ("sum", "mean"):
        coef = w.reshape(-1)
        return (rows * (_normalised(coef, nw.reshape(-1)) if reduction == "mean" else coef)).sum()
    rows = rows.reshape(tw.shape)
    if reduction == "none":
        return (rows * w).reshape(target_shape)
    per_seq = (rows * _normalised(tw, ntw, 1)).sum(1)
    return per_seq if sample_weight is None else per_seq * sample_weight.to(acc)


def run(fn, target_shape, target2, sample_weight, token_weight, ignore_index, reduction,
        needs_grad, acc, make_args, zl, return_lse, cw):
    """Applies the reduction around ``fn`` (a WeightedCE / LinearWeightedCE apply, or the
    composite path); ``cw``: the class weights per token (a ClassWeight) or None."""
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
