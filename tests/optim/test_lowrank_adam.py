"""thresher.optim.LowRankAdam.

Known answers (float64):
* full rank, rotated basis: with rank = min(p, q) (``min_dim=1``), no weight decay, scale 1
  and a basis fixed after the first step, LowRankAdam on f(W) is exactly AdamW on
  g(W') = f(Q W') (side "left") started from W' = Q^T W, mapped back by W = Q W'. (Adam's
  elementwise v is not rotation invariant, so comparing with AdamW on W itself would be
  wrong for a general Q; in Q's coordinates the two algorithms are the same.)
* vectors and small matrices: bit-identical to torch.optim.AdamW(foreach=False).
* the peer: galore_torch's GaLoreAdamW (same SVD basis, same rule for the side) follows the
  same trajectory up to its eps placement (sqrt(v) + eps before bias correction; eps is
  tiny here) and float32 SVD.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from thresher.optim import LowRankAdam


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = gen(0)
        self.w1 = torch.nn.Parameter(torch.randn(12, 20, generator=g, dtype=dtype) / 4)  # left
        self.w2 = torch.nn.Parameter(torch.randn(12, 9, generator=g, dtype=dtype) / 4)   # right
        self.b = torch.nn.Parameter(torch.zeros(9, dtype=dtype))

    def forward(self, x):
        return torch.tanh(x @ self.w1.T) @ self.w2 + self.b


def batch(t, dtype=torch.float64):
    g = gen(1000 + t)
    return torch.randn(16, 20, generator=g, dtype=dtype), torch.randn(16, 9, generator=g, dtype=dtype)


def loss_fn(net, t):
    x, y = batch(t, net.w1.dtype)
    return ((net(x) - y) ** 2).mean()


def train(net, opt, steps, start=1):
    out = []
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(net, t).backward()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()]))
    return out


def test_full_rank_rotated_basis_is_adamw_in_that_basis():
    steps = 6
    net = Net()
    opt = LowRankAdam(net.parameters(), lr=0.02, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.0,
                      rank=64, min_dim=1, update_proj_gap=1000, scale=1.0, proj="svd")
    W1_0, W2_0, b_0 = (p.detach().clone() for p in net.parameters())
    traj = train(net, opt, steps)
    Q1, Q2 = opt.state[net.w1]["Q"], opt.state[net.w2]["Q"]
    assert Q1.shape == (12, 12) and Q2.shape == (9, 9)  # square: full rank
    assert not torch.allclose(Q1.abs(), torch.eye(12, dtype=torch.float64))  # really rotated
    # AdamW on the rotated coordinates W1' = Q1^T W1 (left), W2' = W2 Q2 (right)
    A1 = torch.nn.Parameter(Q1.T @ W1_0)
    A2 = torch.nn.Parameter(W2_0 @ Q2)
    b = torch.nn.Parameter(b_0.clone())
    adam = torch.optim.AdamW([A1, A2, b], lr=0.02, betas=(0.9, 0.99), eps=1e-10,
                             weight_decay=0.0, foreach=False)
    ref = Net()
    for t in range(1, steps + 1):
        adam.zero_grad()
        W1, W2 = Q1 @ A1, A2 @ Q2.T
        x, y = batch(t)
        ((torch.tanh(x @ W1.T) @ W2 + b - y) ** 2).mean().backward()
        adam.step()
        got = traj[t - 1]
        want = torch.cat([(Q1 @ A1).detach().reshape(-1), (A2 @ Q2.T).detach().reshape(-1),
                          b.detach().reshape(-1)])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    del ref


def test_vectors_and_small_matrices_are_bitwise_adamw():
    net, net2 = Net(torch.float32), Net(torch.float32)
    opt = LowRankAdam(net.parameters(), lr=0.01, weight_decay=0.1, rank=128)  # all too small
    ref = torch.optim.AdamW(net2.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    a, b = train(net, opt, 4), train(net2, ref, 4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert all("Q" not in s for s in opt.state.values())


def test_matches_galore_torch():
    GaLoreAdamW = pytest.importorskip(
        "galore_torch", reason="the peer comparison needs galore-torch (dev/bench extras)").GaLoreAdamW

    net, net2 = Net(torch.float32), Net(torch.float32)
    kw = dict(rank=4, update_proj_gap=2, scale=0.25)
    opt = LowRankAdam([{"params": [net.w1, net.w2], **kw}, {"params": [net.b], "rank": None}],
                      lr=0.01, eps=1e-12, proj="svd")
    ref = GaLoreAdamW([{"params": [net2.w1, net2.w2], **kw, "proj_type": "std"},
                       {"params": [net2.b]}], lr=0.01, eps=1e-12, weight_decay=0.0)
    a, b = train(net, opt, 5), train(net2, ref, 5)
    for t, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {t + 1}: {m}")


def test_state_is_two_lowrank_moments_and_the_basis():
    net = Net(torch.float32)
    opt = LowRankAdam(net.parameters(), rank=3, proj="random")
    train(net, opt, 2)
    s1, s2 = opt.state[net.w1], opt.state[net.w2]
    assert set(s1) == {"step", "exp_avg", "exp_avg_sq", "Q"}
    assert s1["exp_avg"].shape == (3, 20) and s1["Q"].shape == (12, 3)     # left: Q^T G
    assert s2["exp_avg_sq"].shape == (12, 3) and s2["Q"].shape == (9, 3)   # right: G Q
    for s, p in ((s1, net.w1), (s2, net.w2)):
        assert all(isinstance(v, torch.Tensor) for v in s.values())
        assert all(v.numel() < p.numel() for v in s.values())  # no full-size buffer
    assert float(s1["step"]) == 2.0
    sb = opt.state_bytes()
    assert sb["lowrank"] == 4 * (1 + 2 * 3 * 20 + 12 * 3 + 1 + 2 * 12 * 3 + 9 * 3)
    assert sb["adamw"] == 4 * (1 + 2 * 9)


@pytest.mark.parametrize("proj", ["svd", "power", "random"])
def test_state_dict_round_trip_is_bit_identical(proj):
    def make():
        net = Net(torch.float32)
        return net, LowRankAdam(net.parameters(), lr=0.01, rank=3, update_proj_gap=2, proj=proj,
                                weight_decay=0.01)

    net, opt = make()
    train(net, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    cont = train(net, opt, 4, start=4)  # crosses two refreshes (steps 5 and 7)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2, opt2 = make()
    net2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    cont2 = train(net2, opt2, 4, start=4)
    for a, b in zip(cont, cont2):
        assert torch.equal(a, b)


def test_gradient_accumulation():
    net, net2 = Net(), Net()
    opt = LowRankAdam(net.parameters(), lr=0.01, rank=3, proj="svd")
    opt2 = LowRankAdam(net2.parameters(), lr=0.01, rank=3, proj="svd")
    x, y = batch(1)
    opt.zero_grad()
    for sl in (slice(0, 8), slice(8, 16)):  # two micro-batches, summed losses
        (((net(x[sl]) - y[sl]) ** 2).sum() / 16 / 9).backward()
    opt.step()
    opt2.zero_grad()
    (((net2(x) - y) ** 2).mean()).backward()
    opt2.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_param_group_overrides_and_projection_schedule():
    net = Net(torch.float32)
    opt = LowRankAdam([{"params": [net.w1], "rank": 2, "update_proj_gap": 3},
                       {"params": [net.w2], "rank": None},
                       {"params": [net.b]}], lr=0.01, rank=4, proj="random")
    seen = []
    for t in range(1, 8):
        opt.zero_grad()
        loss_fn(net, t).backward()
        opt.step()
        seen.append(opt.state[net.w1]["Q"].clone())
    assert opt.state[net.w1]["Q"].shape == (12, 2)
    assert "Q" not in opt.state[net.w2] and opt.state[net.w2]["exp_avg"].shape == (12, 9)
    changed = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # refreshed at steps 4 and 7


def test_power_proj_warm_starts_from_previous_basis():
    net = Net(torch.float32)
    opt = LowRankAdam(net.parameters(), lr=0.01, rank=3, update_proj_gap=2, proj="power")
    train(net, opt, 2)
    Q_before = opt.state[net.w1]["Q"].clone()
    train(net, opt, 1, start=3)  # a refresh: one power iteration from Q_before
    Q_after = opt.state[net.w1]["Q"]
    # continuity: the new basis stays close to the old one (columns aligned, signs kept)
    assert float((Q_after * Q_before).sum(0).min()) > 0.5


def test_closure_and_no_grad_params():
    net = Net()
    extra = torch.nn.Parameter(torch.ones(30, 30, dtype=torch.float64))  # never gets a grad
    opt = LowRankAdam(list(net.parameters()) + [extra], lr=0.01, rank=3)
    loss = opt.step(lambda: (opt.zero_grad(), loss_fn(net, 1).backward(), loss_fn(net, 1))[-1])
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(extra, torch.ones(30, 30, dtype=torch.float64)) and not opt.state[extra]


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(lr=-1.0), ValueError, "lr must be in"),
    (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
    (dict(betas=(1.0, 0.9)), ValueError, r"betas\[0\] must be < 1"),
    (dict(betas=(0.9, math.nan)), ValueError, r"betas\[1\] must be a finite number"),
    (dict(lr=math.inf), ValueError, "lr must be a finite number, got inf"),
    (dict(lr=math.nan), ValueError, "lr must be a finite number, got nan"),
    (dict(eps=math.inf), ValueError, "eps must be a finite number"),
    (dict(weight_decay=math.inf), ValueError, "weight_decay must be a finite number"),
    (dict(scale=math.inf), ValueError, "scale must be a finite number"),
    (dict(rank=0), ValueError, "rank must be >= 1, got 0"),
    (dict(rank=2.0), TypeError, "rank must be an int, got float"),
    (dict(update_proj_gap=0), ValueError, "update_proj_gap must be >= 1"),
    (dict(update_proj_gap="5"), TypeError, "update_proj_gap must be an int"),
    (dict(niter=-1), ValueError, "niter must be >= 0"),
    (dict(seed=0.5), TypeError, "seed must be an int"),
    (dict(proj="qr"), ValueError, "proj must be one of"),
    (dict(side="top"), ValueError, "side must be one of"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be in"),
    (dict(min_dim=0), ValueError, "min_dim must be"),
    (dict(eps="x"), TypeError, "eps must be a number"),
])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LowRankAdam(Net().parameters(), **kw)
    # per-group overrides are checked too, and named by their group
    with pytest.raises(exc, match=r"param_groups\[0\]\['"):
        LowRankAdam([{"params": list(Net().parameters()), **kw}])


def test_meta_parameter_is_refused_by_name():
    w = torch.nn.Parameter(torch.empty(8, 12, device="meta"))
    w.grad = torch.empty(8, 12, device="meta")
    with pytest.raises(ValueError, match="is a meta tensor"):
        LowRankAdam([w], rank=2).step()


def test_default_refresh_is_randomised_then_warm_power():
    """The default ``proj`` is the fast one: the first basis is the randomised SVD's, a later
    refresh one power iteration from the previous basis (not an SVD)."""
    from thresher.ops.lowrank import refresh_projection

    net = Net(torch.float32)
    opt = LowRankAdam(net.parameters(), lr=0.01, rank=3, update_proj_gap=2)
    assert opt.defaults["proj"] == "power"
    opt.zero_grad()
    loss_fn(net, 1).backward()
    g1 = net.w1.grad.clone()
    opt.step()
    Q1 = opt.state[net.w1]["Q"].clone()
    assert torch.equal(Q1, refresh_projection(g1, 3, side="left", method="random", seed=0))
    train(net, opt, 1, start=2)
    opt.zero_grad()
    loss_fn(net, 3).backward()
    g3 = net.w1.grad.clone()
    opt.step()  # step 3: a refresh
    Q3 = opt.state[net.w1]["Q"]
    assert torch.equal(Q3, refresh_projection(g3, 3, side="left", method="power", prev=Q1))
    assert not torch.equal(Q3, refresh_projection(g3, 3, side="left", method="random", seed=1))


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = LowRankAdam(emb.parameters(), rank=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_trains_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    opt = LowRankAdam(model.parameters(), lr=3e-3, rank=8, update_proj_gap=20, scale=1.0,
                      proj="random")
    X = torch.randn(256, 32, generator=gen(5))
    y = (X[:, :4] * 2).argmax(1)
    first = None
    for _ in range(120):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss) < 0.5 * first and math.isfinite(float(loss))


def test_benchmark_cpu_run_writes_markdown_and_json(tmp_path):
    """benchmarks/bench_lowrank.py's interface (the GPU report runs it with --device cuda):
    a run writes Markdown + JSON into --out with thresher's default against every peer
    that imports; missing peers are reported in meta.peers, not fatal."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lowrank.py"
    spec = importlib.util.spec_from_file_location("bench_lowrank_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--quick", "--shapes", "96x160", "--ranks", "8",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "lowrank_quick.json").read_text())
    row = result["rows"][0]
    assert row["device"] == "cpu" and row["shape"] == "96x160" and row["rank"] == 8
    assert {"galore", "torchao_galore"} <= set(result["meta"]["peers"])
    assert row["step_thresher_ms"] > 0 and row["refresh_power_ms"] > 0
    assert 0.99 < row["energy_ratio_power"] <= 1.0 + 1e-6
    if result["meta"]["peers"]["galore"].startswith("ok"):
        assert row["amortised_galore_ms"] > 0
    md = (tmp_path / "lowrank_quick.md").read_text()
    assert "thresher's defaults (proj='power') vs galore-torch" in md and "96x160" in md
