"""What the device suite compares against: float64 truth on the CPU, and the same-dtype
computation PyTorch itself does on the device under test ("eager"). A backend passes when its
error against the truth is at most twice eager's error plus a floor of a few ulps -- the rule
of the op tests in tests/ops, applied per device."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ulps_floor(dtype: torch.dtype, truth: torch.Tensor) -> float:
    scale = float(truth.detach().abs().max()) if truth.numel() else 1.0
    return 4 * torch.finfo(dtype).eps * max(1.0, scale)


def max_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    if truth.numel() == 0:
        return 0.0
    return float((a.detach().cpu().double() - truth.detach().cpu().double()).abs().max())


def assert_close_to_truth(what: str, got, truth, eager, dtype, floor: float | None = None) -> None:
    """``floor``: the absolute slack relative to max(1, |truth|); default 4 ulps of dtype."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    err, eager_err = max_err(got, truth), max_err(eager, truth)
    slack = ulps_floor(dtype, truth) if floor is None else floor * max(
        1.0, float(truth.detach().abs().max()) if truth.numel() else 1.0)
    bound = 2 * eager_err + slack
    assert err <= bound, (f"{what}: error {err:.3e} vs float64 truth > 2 x eager's "
                          f"{eager_err:.3e} + {slack:.1e}")


def weighted_ce(x, target, sw=None, tw=None, reduction="mean", eps=0.0, zl=0.0, ii=-100):
    """The op's definition written with F.cross_entropy (an independent path: not the
    reference backend's row kernel). x: (B, T, V); target (B, T)."""
    B, T, V = x.shape
    flat = x.reshape(-1, V)
    t = target.reshape(-1)
    keep = t != ii
    per = F.cross_entropy(flat, t, reduction="none", ignore_index=ii, label_smoothing=eps)
    if zl:
        lse = torch.logsumexp(flat, -1)
        per = per + zl * torch.where(keep, lse * lse, torch.zeros_like(lse))
    per = per.reshape(B, T)
    tok = keep.reshape(B, T).to(x.dtype) * (1 if tw is None else tw.to(x.dtype))
    full = tok * (1 if sw is None else sw.to(x.dtype)[:, None])
    if reduction == "none":
        return per * full
    if reduction == "sample":
        r = (per * tok).sum(1) / tok.sum(1).clamp_min(1e-30)
        return r if sw is None else r * sw.to(x.dtype)
    if reduction == "sum":
        return (per * full).sum()
    return (per * full).sum() / full.sum().clamp_min(1e-30)


def random_upstream(shape, seed=1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(fn, inputs, upstream):
    """(output, d(output . upstream)/d inputs) with inputs made leaves here."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    u = upstream.to(device=out.device, dtype=out.dtype)
    return out, torch.autograd.grad(out, leaves, u)
