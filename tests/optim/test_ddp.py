"""DDPAdamW and LowRankDDP (thresher.optim.ddp) on a real 2-rank gloo group: each equals its
single-process optimizer stepping on the gradient averaged over the ranks' batches; exact
byte counts; checkpoint/resume; bad configuration."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _optim_workers as W  # noqa: E402

from thresher.optim.ddp import DDPAdamW, LowRankDDP, _LowRankAdam  # noqa: E402

STEPS = 5
NUMEL = 6 * 5 + 3 * 6 + 3
needs_lowrank = pytest.mark.skipif(_LowRankAdam is None,
                                   reason="thresher.optim.LowRankAdam is not in this tree yet")


def reference(opt_cls, kw, world=2):
    """Single process: the optimizer steps on the mean of the ranks' gradients."""
    net = W.TinyNet()
    opt = opt_cls(net.parameters(), **kw)
    traj = []
    for t in range(1, STEPS + 1):
        grads = []
        for r in range(world):
            net.zero_grad()
            x, y = W.batch(r, t)
            (net(x) - y).pow(2).mean().backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for i, p in enumerate(net.parameters()):
            p.grad = sum(g[i] for g in grads) / world
        opt.step()
        traj.append(W.flat(net))
    return torch.stack(traj)


@pytest.mark.parametrize("method", ["ddp", pytest.param("lowrank_ddp", marks=needs_lowrank)])
def test_equals_single_process_on_mean_gradient(method):
    if method == "ddp":
        kw, ref_cls = dict(lr=0.05, weight_decay=0.1), torch.optim.AdamW
    else:
        from thresher.optim.lowrank_adam import LowRankAdam

        kw, ref_cls = dict(lr=0.05, rank=2, update_proj_gap=2), LowRankAdam
    ref = reference(ref_cls, kw)
    out = W.pool().run(W.w_trajectory, method, kw, STEPS)
    for traj, nbytes, counters in out:
        torch.testing.assert_close(traj, ref, rtol=1e-12, atol=1e-14)
        # float64 gradients of every parameter, every step
        assert nbytes == STEPS * 8 * NUMEL
        assert counters["step"] == STEPS
    assert torch.equal(out[0][0], out[1][0])


def test_single_process_counts_no_bytes():
    traj, nbytes, _ = W.w_trajectory(0, 1, "ddp", dict(lr=0.05), 2)
    assert nbytes == 0


def test_resume_bit_identical(tmp_path):
    W.check_resume("ddp", dict(lr=0.05, weight_decay=0.1), 3, tmp_path)


@needs_lowrank
def test_lowrank_resume_bit_identical(tmp_path):
    W.check_resume("lowrank_ddp", dict(lr=0.05, rank=2, update_proj_gap=2), 3, tmp_path)


def test_bad_config():
    with pytest.raises(ValueError, match="timeout must be a positive"):
        DDPAdamW(W.TinyNet().parameters(), timeout=-1)
    with pytest.raises(ValueError, match="process_group was given"):
        DDPAdamW(W.TinyNet().parameters(), process_group=object())


@pytest.mark.parametrize("kw, match", [
    (dict(lr=math.inf), "lr must be finite, got inf"),
    (dict(eps=math.inf), "eps must be finite"),
    (dict(weight_decay=math.inf), "weight_decay must be finite"),
])
@pytest.mark.parametrize("cls", [DDPAdamW, pytest.param(LowRankDDP, marks=needs_lowrank)])
def test_non_finite_hyper_parameters(cls, kw, match):
    # torch's AdamW (and LowRankAdam's range checks) accept an infinite lr, eps or decay
    with pytest.raises(ValueError, match=match):
        cls(W.TinyNet().parameters(), **kw)
    net = W.TinyNet()
    groups = [dict(params=[net.w1, net.w2]), dict(params=[net.b], **kw)]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['"):
        cls(groups)


@needs_lowrank
def test_lowrank_ddp_non_finite_scale():
    with pytest.raises(ValueError, match="scale must be finite"):
        LowRankDDP(W.TinyNet().parameters(), scale=math.inf)


def test_load_rejects_foreign_state_dict():
    opt = DDPAdamW(W.TinyNet().parameters())
    with pytest.raises(ValueError, match="no 'thresher' entry"):
        opt.load_state_dict(torch.optim.AdamW(W.TinyNet().parameters()).state_dict())
