"""The PyTorch reference of the cross-entropy row kernels: plain differentiable ops in the
accumulation dtype (float64 for float64 inputs), the ground every other backend is tested
against, and what the double-backward and ``backend="torch"`` paths differentiate through.
The maths: docs/kernels.md ("Cross-entropy")."""
from __future__ import annotations

import math

import torch

__all__ = ["FLOAT_DTYPES", "acc_dtype", "softcap", "reference_cross_entropy_rows"]

# The dtypes the ops take (the reference and cpu backends run them all).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses and lse are accumulated and returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcap(xf, cap):
    return xf if not cap else cap * torch.tanh(xf / cap)


def reference_cross_entropy_rows(x, target, coef, ignore_index, eps, zl, sc=0.0, lse=None):
    """Reference row kernel. Returns ``(loss, lse, grad)``; ``grad`` is None unless ``coef``
    is given. Passing ``lse`` skips its computation (the backward). ``sc``: soft-cap (0 off).
    Plain differentiable PyTorch ops throughout (the double-backward path uses it)."""
    acc = acc_dtype(x.dtype)
    xf = softcap(x.to(acc), sc)
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
