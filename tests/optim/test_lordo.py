"""LoRDO (thresher.optim.lordo) on real gloo process groups (2 ranks on loopback).

Known answers: a float64 transcription of docs/algorithms.md §3 written plainly below (two
workers, six steps, two syncs, clipping active, projection error feedback, the full-rank
quasi-hyperbolic term, weight decay, Nesterov outer step, bases from the averaged Δ); M ranks
that see identical data equal one rank; all ranks identical after a sync; exact byte counts;
checkpoint/resume; a dead rank; bad configurations.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _optim_workers as W  # noqa: E402

from thresher.optim.lordo import LoRDO  # noqa: E402

STEPS = 6


# ----------------------------------------------------------------------------------------
# The transcription (float64, plain loops, no thresher code)
# ----------------------------------------------------------------------------------------


def top_r(matrix, r, side):
    """The basis of the reduced side: left singular vectors ("left", Q: p x r) or right ones
    ("right", Q: q x r) of the matrix."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :r] if side == "left" else Vh[:r].T


def reference_lordo(M, steps, cfg):
    lr, r, K = cfg["lr"], cfg["rank"], cfg["sync_every"]
    om, mu, rho = cfg["omega"], cfg["mu"], cfg["clip"]
    b1, b2 = cfg["betas"]
    eps, wd = cfg["eps"], cfg["weight_decay"]
    olr, omom = cfg["outer_lr"], cfg["outer_momentum"]
    sides = {"w1": "right", "w2": "left"}  # 6x5: p >= q -> right; 3x6 -> left
    net = W.TinyNet(torch.float64)
    anchor = {k: v.detach().clone() for k, v in net.named_parameters()}
    theta = [{k: v.clone() for k, v in anchor.items()} for _ in range(M)]
    buf = {k: torch.zeros_like(v) for k, v in anchor.items()}
    E = [{k: torch.zeros_like(anchor[k]) for k in sides} for _ in range(M)]
    u = [dict() for _ in range(M)]
    v = [dict() for _ in range(M)]
    m_vec = [{"b": torch.zeros(3, dtype=torch.float64)} for _ in range(M)]
    v_vec = [{"b": torch.zeros(3, dtype=torch.float64)} for _ in range(M)]
    Q = {}
    traj = [[] for _ in range(M)]
    for t in range(1, steps + 1):
        Ghat = []
        for m in range(M):
            params = {k: x.clone().requires_grad_(True) for k, x in theta[m].items()}
            x, y = W.batch(m, t)
            grads = torch.autograd.grad(W.loss_fn(params, x, y), list(params.values()))
            G = dict(zip(params, grads))
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in G.values()))
            c = min(1.0, rho / (norm + 1e-6))
            Ghat.append({k: c * g for k, g in G.items()})
        if t == 1:  # init_proj="grad": top-r of the averaged clipped first gradient
            for k, side in sides.items():
                Q[k] = top_r(sum(Ghat[m][k] for m in range(M)) / M, r, side)
        for m in range(M):
            for k, side in sides.items():
                G = Ghat[m][k]
                A = G + E[m][k]
                if side == "left":
                    g = Q[k].T @ A
                    E[m][k] = A - Q[k] @ g
                else:
                    g = A @ Q[k]
                    E[m][k] = A - g @ Q[k].T
                u[m][k] = b1 * u[m].get(k, 0.0 * g) + (1 - b1) * g
                v[m][k] = b2 * v[m].get(k, 0.0 * g) + (1 - b2) * g * g
                uh = u[m][k] / (1 - b1 ** t)
                vh = v[m][k] / (1 - b2 ** t)
                if side == "left":  # D: RMS of sqrt(v_hat) over the rank dimension
                    D = vh.mean(0, keepdim=True).sqrt()
                    low = Q[k] @ (uh / (vh.sqrt() + eps))
                else:
                    D = vh.mean(1, keepdim=True).sqrt()
                    low = (uh / (vh.sqrt() + eps)) @ Q[k].T
                th = theta[m][k] * (1 - lr * wd)
                theta[m][k] = th - lr * ((1 - om) * G / (mu * (D + eps)) + om * low)
            # the bias: plain AdamW
            g = Ghat[m]["b"]
            m_vec[m]["b"] = b1 * m_vec[m]["b"] + (1 - b1) * g
            v_vec[m]["b"] = b2 * v_vec[m]["b"] + (1 - b2) * g * g
            mh = m_vec[m]["b"] / (1 - b1 ** t)
            vh = v_vec[m]["b"] / (1 - b2 ** t)
            theta[m]["b"] = theta[m]["b"] * (1 - lr * wd) - lr * mh / (vh.sqrt() + eps)
        if t % K == 0:
            for k in anchor:
                delta = sum(theta[m][k] - anchor[k] for m in range(M)) / M
                buf[k] = omom * buf[k] - delta               # SGD momentum on -delta
                d = -delta + omom * buf[k]                   # Nesterov
                new = anchor[k] - olr * d
                anchor[k] = new
                for m in range(M):
                    theta[m][k] = new.clone()
                if k in sides:
                    Q[k] = top_r(delta, r, sides[k])
        for m in range(M):
            traj[m].append(torch.cat([theta[m][k].reshape(-1) for k in ("w1", "w2", "b")]))
    return [torch.stack(tr) for tr in traj]


# ----------------------------------------------------------------------------------------
# One 2-rank session for the known answers
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks():
    return W.pool().run(W.w_trajectory, "lordo", W.LORDO_CFG, STEPS)


def test_matches_float64_transcription(two_ranks):
    ref = reference_lordo(2, STEPS, W.LORDO_CFG)
    for rank, (traj, _, _) in enumerate(two_ranks):
        for t in range(STEPS):
            torch.testing.assert_close(traj[t], ref[rank][t], rtol=1e-9, atol=1e-11,
                                       msg=lambda m: f"rank {rank}, step {t + 1}: {m}")
    # the ranks really did differ between syncs (the check above is not vacuous)
    assert not torch.equal(two_ranks[0][0][1], two_ranks[1][0][1])


def test_clipping_was_active():
    x, y = W.batch(0, 1)
    net = W.TinyNet()
    W.loss_fn(dict(net.named_parameters()), x, y).backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters()))
    assert norm > W.LORDO_CFG["clip"]


def test_ranks_identical_after_sync(two_ranks):
    K = W.LORDO_CFG["sync_every"]
    for t in range(K - 1, STEPS, K):
        assert torch.equal(two_ranks[0][0][t], two_ranks[1][0][t])


def test_byte_count_formula(two_ranks):
    numel = 6 * 5 + 3 * 6 + 3
    syncs = STEPS // W.LORDO_CFG["sync_every"]
    # init_proj="grad": one all-reduce of the two matrices' first gradients
    expect = 8 * (6 * 5 + 3 * 6) + syncs * 8 * numel
    for _, nbytes, counters in two_ranks:
        assert nbytes == expect
        assert counters["syncs"] == syncs and counters["step"] == STEPS


def test_m_ranks_identical_data_equal_one_rank():
    cfg = dict(W.LORDO_CFG, init_proj="random", outer="average")
    multi = W.pool().run(W.w_trajectory, "lordo", cfg, STEPS, torch.float32, True)
    single, nbytes, _ = W.w_trajectory(0, 1, "lordo", cfg, STEPS, torch.float32, True)
    assert nbytes == 0
    for traj, _, _ in multi:
        assert torch.equal(traj, single)


def test_checkpoint_resume_bit_identical(tmp_path):
    cfg = dict(W.LORDO_CFG, init_proj="random")
    k = 4  # sync_every 3: a sync before the checkpoint and one after it
    W.check_resume("lordo", cfg, k, tmp_path)


def test_dead_rank_raises_clear_error():
    cfg = dict(W.LORDO_CFG, sync_every=2, timeout=10.0)
    out = W.run_ranks(W.w_dead_rank, 2, "lordo", cfg, timeout=10.0, allow_missing=(1,))
    kind, msg, waited = out[0]
    assert kind == "CollectiveError", msg
    assert "rank 0 of 2" in msg and "timeout" in msg
    assert waited < 10.0 + 5.0


@pytest.mark.parametrize("kw, match", [
    (dict(rank=4), "rank=4 is larger than the matrix"),     # w2 is 3x6
    (dict(sync_every=0), "sync_every must be >= 1"),
    (dict(compression="zip"), "compression must be None"),
    (dict(omega=1.5), "omega must be in"),
    (dict(outer="adam"), "outer must be one of"),
    (dict(proj="qr"), "proj must be one of"),
    (dict(timeout=0), "timeout must be a positive"),
    # non-finite hyper-parameters, each named
    (dict(rank=2, lr=math.inf), "lr must be a finite number, got inf"),
    (dict(rank=2, eps=math.inf), "eps must be a finite number"),
    (dict(rank=2, mu=math.inf), "mu must be a finite number"),
    (dict(rank=2, mu=0.0), r"mu must be in \(0"),
    (dict(rank=2, omega=math.nan), "omega must be a finite number"),
    (dict(rank=2, weight_decay=math.inf), "weight_decay must be a finite number"),
    (dict(rank=2, betas=(0.9, math.nan)), r"betas\[1\] must be a finite number"),
    (dict(rank=2, betas=(0.9, 1.0)), r"betas\[1\] must be < 1"),
    (dict(rank=2, clip=math.inf), "clip must be a finite number"),
    (dict(rank=2, outer_lr=math.inf), "outer_lr must be a finite number"),
    (dict(rank=2, outer_momentum=math.nan), "outer_momentum must be a finite number"),
    (dict(rank=2, timeout=math.inf), "timeout must be a positive finite"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRDO(W.TinyNet().parameters(), **kw)


def test_bad_param_group_hyper_parameter_is_named():
    net = W.TinyNet()
    groups = [dict(params=[net.w1, net.w2]), dict(params=[net.b], lr=math.inf)]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite number"):
        LoRDO(groups, rank=2)
    with pytest.raises(TypeError, match="seed must be an int"):
        LoRDO(net.parameters(), rank=2, seed=1.5)
    with pytest.raises(TypeError, match="rank must be an int, got float"):
        LoRDO(net.parameters(), rank=2.0)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['rank'\] must be >= 1, got 0"):
        LoRDO([dict(params=[net.w1, net.w2]), dict(params=[net.b], rank=0)], rank=2)


def test_state_dict_weights_only_roundtrip(tmp_path):
    net = W.TinyNet()
    opt = LoRDO(net.parameters(), **dict(W.LORDO_CFG, init_proj="random"))
    W.train(net, opt, 0, range(1, 5))
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    sd = torch.load(tmp_path / "o.pt", weights_only=True)
    opt2 = LoRDO(W.TinyNet().parameters(), **dict(W.LORDO_CFG, init_proj="random"))
    opt2.load_state_dict(sd)
    for p, q in zip(opt.state.values(), opt2.state.values()):
        assert p.keys() == q.keys()
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert opt2.step_count == 4


COMPRESSED = dict(W.LORDO_CFG, init_proj="random", compression="topk",
                  compression_options=dict(k=4, chunk=16, bits=2))


def test_compressed_sync_bytes_and_agreement():
    from thresher.comm import HEADER_BYTES as HEADER
    from thresher.ops.compress import topk_nbytes

    out = W.pool().run(W.w_trajectory, "lordo", COMPRESSED, STEPS, torch.float32)
    syncs = STEPS // 3
    per_sync = topk_nbytes(30, 4, 16, 2) + topk_nbytes(18, 4, 16, 2) + 2 * HEADER + 3 * 4
    for traj, nbytes, _ in out:
        assert nbytes == syncs * per_sync
    for t in (2, 5):
        assert torch.equal(out[0][0][t], out[1][0][t])


def test_compressed_resume_bit_identical(tmp_path):
    W.check_resume("lordo", COMPRESSED, 4, tmp_path)
