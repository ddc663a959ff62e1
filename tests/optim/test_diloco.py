"""DiLoCo and SparseLoCo (thresher.optim.diloco) on a real 2-rank gloo group."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _optim_workers as W  # noqa: E402

from thresher.optim.diloco import DiLoCo, SparseLoCo  # noqa: E402

STEPS = 6
NUMEL = 6 * 5 + 3 * 6 + 3


def test_h1_plain_averaging_equals_ddp_adamw():
    # Ranks see identical data: averaging the AdamW steps equals AdamW on the averaged
    # gradient only then (AdamW is nonlinear in the gradient), which is what makes this a
    # known answer for the outer loop's algebra (sign of Δ, anchor, outer lr).
    adamw = dict(lr=0.05, weight_decay=0.1)
    dil = W.pool().run(W.w_trajectory, "diloco",
                       dict(adamw, sync_every=1, outer_lr=1.0, outer_momentum=0.0),
                       STEPS, torch.float64, True)
    ddp = W.pool().run(W.w_trajectory, "ddp", adamw, STEPS, torch.float64, True)
    for (a, ba, _), (b, bb, _) in zip(dil, ddp):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        assert ba == bb == STEPS * 8 * NUMEL


def local_steps(nets, opts, t, dtype):
    """One inner AdamW step of every simulated worker on its own batch."""
    for r, (net, opt) in enumerate(zip(nets, opts)):
        x, y = W.batch(r, t, dtype)
        opt.zero_grad()
        (net(x) - y).pow(2).mean().backward()
        opt.step()


def reference_diloco(H, steps, adamw, outer_lr, mom, world=2):
    """Plain transcription: per-worker torch AdamW, every H steps Nesterov SGD on -mean Δ."""
    nets = [W.TinyNet() for _ in range(world)]
    opts = [torch.optim.AdamW(n.parameters(), **adamw) for n in nets]
    anchor = [p.detach().clone() for p in nets[0].parameters()]
    buf = [torch.zeros_like(a) for a in anchor]
    traj = [[] for _ in range(world)]
    for t in range(1, steps + 1):
        local_steps(nets, opts, t, torch.float64)
        if t % H == 0:
            with torch.no_grad():
                for i in range(len(anchor)):
                    ps = [list(n.parameters())[i] for n in nets]
                    g = -(sum(p - anchor[i] for p in ps) / world)
                    buf[i] = mom * buf[i] + g
                    new = anchor[i] - outer_lr * (g + mom * buf[i])
                    anchor[i] = new
                    for p in ps:
                        p.copy_(new)
        for r in range(world):
            traj[r].append(W.flat(nets[r]))
    return [torch.stack(tr) for tr in traj]


def test_diloco_matches_transcription_and_bytes():
    adamw = dict(lr=0.05, weight_decay=0.1)
    H = 3
    out = W.pool().run(W.w_trajectory, "diloco", dict(adamw, sync_every=H), STEPS)
    ref = reference_diloco(H, STEPS, adamw, 0.7, 0.9)
    for r, (traj, nbytes, counters) in enumerate(out):
        torch.testing.assert_close(traj, ref[r], rtol=1e-12, atol=1e-14)
        assert nbytes == (STEPS // H) * 8 * NUMEL
        assert counters["syncs"] == STEPS // H
    assert not torch.equal(out[0][0][0], out[1][0][0])   # ranks differ between syncs
    assert torch.equal(out[0][0][H - 1], out[1][0][H - 1])  # and agree after one


def test_diloco_resume_bit_identical(tmp_path):
    W.check_resume("diloco", dict(lr=0.05, sync_every=3), 4, tmp_path)


@pytest.mark.parametrize("cls, kw, match", [
    (DiLoCo, dict(sync_every=0), "sync_every must be >= 1"),
    (DiLoCo, dict(outer_momentum=1.5), "outer_momentum must be in"),
    (SparseLoCo, dict(k=10, chunk=4), "k must be <= chunk"),
    (SparseLoCo, dict(codec="zip"), "compression must be None"),
    # non-finite hyper-parameters, each named (torch's AdamW lets lr, eps, wd = inf through)
    (DiLoCo, dict(lr=math.inf), "lr must be finite, got inf"),
    (DiLoCo, dict(eps=math.inf), "eps must be finite"),
    (DiLoCo, dict(weight_decay=math.inf), "weight_decay must be finite"),
    (DiLoCo, dict(outer_lr=math.inf), "outer_lr must be finite"),
    (DiLoCo, dict(outer_lr=0.0), "outer_lr must be > 0"),
    (DiLoCo, dict(outer_momentum=math.nan), "outer_momentum must be in"),
    (DiLoCo, dict(timeout=math.inf), "timeout must be a positive finite"),
    (SparseLoCo, dict(beta=math.nan), "beta must be in"),
    (SparseLoCo, dict(lr=math.inf), "lr must be finite"),
])
def test_bad_config(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(W.TinyNet().parameters(), **kw)


SPARSE = dict(lr=0.05, sync_every=3, beta=0.95, k=4, chunk=16, bits=2)


def reference_sparseloco(steps, kw, world=2):
    """Plain transcription of SparseLoCo with the compression ops: e = β e + Δ^m, send
    TopK+2-bit of e (e loses what was sent), mean over the ranks that sent each index,
    θ = anchor + Δ̂ (outer SGD lr 1, no momentum). Matrices >= one chunk are sparse, the
    bias is averaged densely."""
    from thresher.ops.compress import topk_decode, topk_encode

    k, chunk, bits, beta, H = kw["k"], kw["chunk"], kw["bits"], kw["beta"], kw["sync_every"]
    nets = [W.TinyNet(torch.float32) for _ in range(world)]
    opts = [torch.optim.AdamW(n.parameters(), lr=kw["lr"]) for n in nets]
    anchor = [p.detach().clone() for p in nets[0].parameters()]
    err = [[torch.zeros_like(a) for a in anchor] for _ in range(world)]
    traj = [[] for _ in range(world)]
    for t in range(1, steps + 1):
        local_steps(nets, opts, t, torch.float32)
        if t % H == 0:
            with torch.no_grad():
                for i, a in enumerate(anchor):
                    ps = [list(n.parameters())[i] for n in nets]
                    if a.numel() >= chunk:
                        out = torch.zeros(a.numel())
                        cnt = torch.zeros(a.numel(), dtype=torch.int32)
                        for r in range(world):
                            err[r][i].mul_(beta)
                            msg = topk_encode(ps[r] - a, err[r][i], k=k, chunk=chunk, bits=bits)
                            topk_decode(msg, a.numel(), k=k, chunk=chunk, bits=bits, out=out,
                                        count=cnt)
                        delta = (out / cnt.clamp_min(1)).view_as(a)
                    else:
                        delta = sum(p - a for p in ps) / world
                    new = a + delta
                    anchor[i] = new
                    for p in ps:
                        p.copy_(new)
        for r in range(world):
            traj[r].append(W.flat(nets[r]))
    return [torch.stack(tr) for tr in traj]


def test_sparseloco_matches_transcription_and_bytes():
    from thresher.comm import HEADER_BYTES as HEADER
    from thresher.ops.compress import topk_nbytes

    out = W.pool().run(W.w_trajectory, "sparseloco", SPARSE, STEPS, torch.float32)
    ref = reference_sparseloco(STEPS, SPARSE)
    for r, (traj, nbytes, _) in enumerate(out):
        torch.testing.assert_close(traj, ref[r], rtol=1e-6, atol=1e-7)
        per_sync = topk_nbytes(30, 4, 16, 2) + topk_nbytes(18, 4, 16, 2) + 2 * HEADER + 3 * 4
        assert nbytes == (STEPS // 3) * per_sync
    assert torch.equal(out[0][0][2], out[1][0][2])
    assert not torch.equal(out[0][0][3], out[1][0][3])


def test_sparseloco_resume_bit_identical(tmp_path):
    W.check_resume("sparseloco", SPARSE, 4, tmp_path)
