"""weighted_cross_entropy and linear_weighted_cross_entropy on every device x backend x
claimed dtype (tests/conftest.py: ``backend_case``), against float64 CPU truth with the op
tests' tolerance: at most 2x the error of the same-dtype PyTorch computation on that device
plus a few ulps. Loss and gradients (for a random upstream where the loss is not a scalar)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import thresher
from thresher.ops.cross_entropy import DISPATCH  # noqa: F401 - read by tests/conftest.py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _truth import assert_close_to_truth, grads, random_upstream, weighted_ce  # noqa: E402


def make(B, T, V, dtype, device, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, V, (B, T), generator=g)
    t[torch.rand(B, T, generator=g) < ignore_frac] = -100
    sw = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    tw = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype)
    return x, t, sw, tw, [a.to(device) for a in (x, t, sw, tw)]


def check_ce(backend_case, B, T, V, reduction, eps, zl, **kw):
    dev, be, dt = backend_case
    x, t, sw, tw, (xd, td, swd, twd) = make(B, T, V, dt, dev, **kw)

    def op(xx):
        return thresher.weighted_cross_entropy(xx, td, sample_weight=swd, token_weight=twd,
                                               reduction=reduction, label_smoothing=eps,
                                               z_loss=zl, backend=be)

    out, (gx,) = grads(op, [xd], random_upstream(t.shape if reduction == "none" else
                                                  (B,) if reduction == "sample" else ()))
    u = random_upstream(out.shape)
    truth, (g64,) = grads(lambda xx: weighted_ce(xx, t, sw.double(), tw.double(), reduction,
                                                 eps, zl), [x.double()], u)
    eager, (ge,) = grads(lambda xx: weighted_ce(xx, td, swd, twd, reduction, eps, zl), [xd], u)
    assert out.device == dev and gx.dtype == dt
    assert out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert_close_to_truth(f"{be} loss", out, truth, eager, dt)
    assert_close_to_truth(f"{be} grad", gx, g64, ge, dt)


@pytest.mark.parametrize("reduction", ["none", "sample", "sum", "mean"])
@pytest.mark.parametrize("eps,zl", [(0.0, 0.0), (0.1, 1e-3)])
def test_weighted_ce(backend_case, reduction, eps, zl):
    check_ce(backend_case, 3, 5, 1003, reduction, eps, zl)


@pytest.mark.parametrize("V", [1, 7, 50257])
def test_weighted_ce_awkward_vocab(backend_case, V):
    check_ce(backend_case, 1, 3, V, "mean", 0.05, 1e-4, ignore_frac=0.0)


def test_overwrite_logits(backend_case):
    dev, be, dt = backend_case
    x, t, sw, _, (xd, td, swd, _) = make(2, 4, 517, dt, dev)
    own = xd.clone().requires_grad_()
    loss = thresher.weighted_cross_entropy(own, td, sample_weight=swd, overwrite_logits=True,
                                           backend=be)
    (g,) = torch.autograd.grad(loss, own)
    truth, (g64,) = grads(lambda xx: weighted_ce(xx, t, sw.double()), [x.double()],
                          random_upstream(()).fill_(1.0))
    eager, (ge,) = grads(lambda xx: weighted_ce(xx, td, swd), [xd], random_upstream(()).fill_(1))
    assert_close_to_truth(f"{be} loss", loss, truth, eager, dt)
    assert_close_to_truth(f"{be} grad", g, g64, ge, dt)


@pytest.mark.parametrize("reduction", ["sample", "mean"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_weighted_ce(backend_case, reduction, bias):
    dev, be, dt = backend_case
    B, T, H, V = 2, 9, 48, 1001
    g = torch.Generator().manual_seed(5)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dt)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dt)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dt) if bias else None
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :2] = -100
    sw = torch.rand(B, generator=g, dtype=torch.float64).to(dt)
    ins = [h, w] + ([b] if bias else [])
    ins_d = [a.to(dev) for a in ins]
    td, swd = t.to(dev), sw.to(dev)
    u = random_upstream((B,) if reduction == "sample" else ())

    def op(hh, ww, bb=None):  # chunk_size 7: several chunks and a ragged last one
        return thresher.linear_weighted_cross_entropy(hh, ww, td, bias=bb, sample_weight=swd,
                                                      reduction=reduction, chunk_size=7,
                                                      backend=be)

    def formula(tt, s):
        return lambda hh, ww, bb=None: weighted_ce(
            hh @ ww.T + (0 if bb is None else bb), tt, s, None, reduction)

    out, g_out = grads(op, ins_d, u)
    truth, g_truth = grads(formula(t, sw.double()), [a.double() for a in ins], u)
    eager, g_eager = grads(formula(td, swd), ins_d, u)
    assert_close_to_truth(f"{be} loss", out, truth, eager, dt)
    for name, a, tr, e in zip(("hidden", "lm_weight", "bias"), g_out, g_truth, g_eager):
        assert a.dtype == dt and a.device == dev
        assert_close_to_truth(f"{be} d{name}", a, tr, e, dt)


def test_2d_logits_int32_target_sum(backend_case):
    """(N, V) logits with int32 targets, reduction "sum", no weights."""
    dev, be, dt = backend_case
    x, t, _, _, (xd, td, _, _) = make(1, 37, 333, dt, dev, seed=4)
    x2, xd2, t2, td2 = x[0], xd[0], t[0], td[0].to(torch.int32)
    out, (gx,) = grads(lambda xx: thresher.weighted_cross_entropy(xx, td2, reduction="sum",
                                                                  backend=be),
                       [xd2], random_upstream(()))
    u = random_upstream(())
    truth, (g64,) = grads(lambda xx: weighted_ce(xx[None], t2[None], reduction="sum"),
                          [x2.double()], u)
    eager, (ge,) = grads(lambda xx: weighted_ce(xx[None], td2[None].long(), reduction="sum"),
                         [xd2], u)
    assert_close_to_truth(f"{be} loss", out, truth, eager, dt)
    assert_close_to_truth(f"{be} grad", gx, g64, ge, dt)
