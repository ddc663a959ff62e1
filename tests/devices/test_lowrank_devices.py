"""Low-rank ops on every device: projection and back-projection, the three refresh methods,
and the fused low-rank Adam / LoRDO step on every device x backend x claimed dtype
(tests/conftest.py), against float64 CPU truth. The step's tolerance is tests/ops's: at most
2x the error of the reference backend run in the same dtype on the same device, plus 2^-20."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from thresher.ops.lowrank import (
    DISPATCH,
    lowrank_adam_step,
    project,
    project_back,
    refresh_projection,
    reference_lowrank_adam_step,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _truth import assert_close_to_truth  # noqa: E402

STEP_FLOOR = 2.0 ** -20
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def power_law(p, q, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(p, q)
    U = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(q, k, generator=g, dtype=torch.float64)).Q
    return (U * torch.arange(1, k + 1, dtype=torch.float64) ** -1.0) @ V.T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side,p,q,r", [("left", 37, 90, 5), ("right", 90, 37, 5)])
def test_project_and_back(device_under_test, dtype, side, p, q, r):
    g = torch.Generator().manual_seed(p)
    G = torch.randn(p, q, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(p if side == "left" else q, r, generator=g,
                                    dtype=torch.float64)).Q
    Gd, Qd = G.to(device_under_test, dtype), Q.to(device_under_test, dtype)
    R = project(Gd, Qd, side)
    truth = Q.T @ G if side == "left" else G @ Q
    eager = Qd.T @ Gd if side == "left" else Gd @ Qd
    assert R.device == device_under_test and R.dtype == dtype
    assert_close_to_truth("project", R, truth, eager, dtype)
    B = project_back(R, Qd, side)
    back = Q @ truth if side == "left" else truth @ Q.T
    eager_back = Qd @ eager if side == "left" else eager @ Qd.T
    assert_close_to_truth("project_back", B, back, eager_back, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["svd", "random", "power"])
def test_refresh_captures_the_top_subspace(device_under_test, dtype, method):
    M = power_law(120, 70, seed=3)
    r = 6
    Md = M.to(device_under_test, dtype)
    prev = refresh_projection(Md, r, side="right", method="random", seed=1) \
        if method == "power" else None
    Q = refresh_projection(Md, r, side="right", method=method, prev=prev, seed=1, niter=4)
    assert Q.device == device_under_test and Q.dtype == dtype and Q.shape == (70, r)
    Q64 = Q.cpu().double()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(Q64.T @ Q64, torch.eye(r, dtype=torch.float64), atol=tol, rtol=0)
    best = float(torch.linalg.svdvals(M)[:r].pow(2).sum())
    got = float((M @ Q64).pow(2).sum())
    assert got >= best * (1 - (2e-2 if dtype == torch.bfloat16 else 1e-3)), (got, best)


def problem(p, q, r, side, lordo, seed):
    g = torch.Generator().manual_seed(seed)
    d = p if side == "left" else q
    low = (r, q) if side == "left" else (p, r)
    W = torch.randn(p, q, generator=g, dtype=torch.float64)
    G = torch.randn(p, q, generator=g, dtype=torch.float64) * 0.1
    Q = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
    m = 0.1 * torch.randn(low, generator=g, dtype=torch.float64)
    v = 0.05 * torch.rand(low, generator=g, dtype=torch.float64)
    E = 0.3 * torch.randn(p, q, generator=g, dtype=torch.float64) if lordo else None
    return [W, G, Q, m, v, E]


HP = dict(step=3, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, scale=0.25,
          mu=1.5)


def stepped(fn, tensors, dtype, device, side, omega, **kw):
    W, G, Q, m, v, E = [None if t is None else t.to(device, dtype).clone() for t in tensors]
    fn(W, G, Q, m, v, side=side, error=E, omega=omega, **HP, **kw)
    return W, m, v, E


@pytest.mark.parametrize("lordo", [False, True], ids=["galore", "lordo"])
@pytest.mark.parametrize("side,p,q,r", [("left", 33, 130, 8), ("right", 130, 33, 8),
                                        ("left", 1, 9, 1)])
def test_fused_step(backend_case, side, p, q, r, lordo):
    dev, be, dt = backend_case
    t = problem(p, q, r, side, lordo, p * 100 + q)
    omega = 0.4 if lordo else 0.0
    truth = stepped(reference_lowrank_adam_step, t, torch.float64, "cpu", side, omega)
    eager = stepped(reference_lowrank_adam_step, t, dt, dev, side, omega)
    got = stepped(lowrank_adam_step, t, dt, dev, side, omega, backend=be)
    for name, a, tr, e in zip(("param", "exp_avg", "exp_avg_sq", "error"), got, truth, eager):
        if tr is None:
            assert a is None
            continue
        assert a.dtype == dt and a.device == dev
        assert_close_to_truth(f"{be} {name}", a, tr, e, dt, floor=STEP_FLOOR)
