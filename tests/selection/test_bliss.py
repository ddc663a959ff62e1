"""BLISS known answers: the hypergradient on weighted ridge regression (closed-form lower
level) vs the exact implicit-function hypergradient; batched <grad l_i, z> vs a per-sample
loop; checkpoint/resume bit-identical; the scorer end to end on synthetic tokens."""
import numpy as np
import pytest
import torch
from torch.func import functional_call

from thresher.models.gpt import GPT, GPTConfig
from thresher.selection import bliss as bliss_mod
from thresher.selection.base import build_scorer
from thresher.selection.bliss import batched_directional_derivative, bliss_hypergradient


def ridge_problem(n=12, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # anisotropic features: H is far from a multiple of I, so z = H^-1 F differs from F
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -0.7, d,
                                                                             dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(20, d, generator=g, dtype=torch.float64)
    yv = Xv @ torch.randn(d, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    return X, y, Xv, yv, s


def ridge_solution(X, y, P, reg):
    d = X.size(1)
    H = X.t() @ (P[:, None] * X) + 2 * reg * torch.eye(d, dtype=X.dtype)  # Hessian of g
    return torch.linalg.solve(H, X.t() @ (P * y)), H


def val_loss(w, Xv, yv):
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


def exact_and_ours(z_loops, lr_z=None, lambda_z=0.0, reg=1e-3):
    X, y, Xv, yv, s = ridge_problem()
    # exact: autograd through the closed-form argmin (float64)
    s_ = s.clone().requires_grad_(True)
    w_star, _ = ridge_solution(X, y, torch.softmax(s_, 0), reg)
    exact, = torch.autograd.grad(val_loss(w_star, Xv, yv), s_)
    # ours, at the same lower-level solution
    P = torch.softmax(s, 0)
    w, H = ridge_solution(X, y, P, reg)
    w = w.detach().requires_grad_(True)
    F, = torch.autograd.grad(val_loss(w, Xv, yv), w)
    if lr_z is None:
        lr_z = 1.0 / float(torch.linalg.eigvalsh(H).max())

    def sample_loss(p):
        return 0.5 * (X @ p["w"] - y) ** 2

    ours, gz, z = bliss_hypergradient(sample_loss, {"w": w}, P, {"w": F}, z_loops=z_loops,
                                      lr_z=lr_z, lambda_z=lambda_z, reg=reg)
    return exact, ours, z["w"], torch.linalg.solve(H, F)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_ridge_hypergradient_matches_implicit_function_theorem():
    exact, ours, z, z_true = exact_and_ours(z_loops=1500)
    assert cos(exact, ours) >= 0.99
    torch.testing.assert_close(z, z_true, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-12)
    # the softmax Jacobian: hypergradients of the scores sum to zero
    assert abs(float(ours.sum())) < 1e-12


def test_ridge_hypergradient_improves_with_z_loops():
    errs, coss = [], []
    for loops in (1, 3, 10, 30, 100, 300):
        exact, ours, *_ = exact_and_ours(z_loops=loops)
        errs.append(float((ours - exact).norm() / exact.norm()))
        coss.append(cos(exact, ours))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert coss[0] < 0.99 <= coss[-1], coss


def damped_ridge(lam):
    """``(hyper, H, want)``: ``hyper(**kw)`` runs bliss_hypergradient at the weighted ridge
    solution (reg 1e-3, damping ``lam``); ``want = (H + lam I)^-1 F``."""
    X, y, Xv, yv, s = ridge_problem()
    P = torch.softmax(s, 0)
    w, H = ridge_solution(X, y, P, 1e-3)
    F, = torch.autograd.grad(val_loss(w.requires_grad_(True), Xv, yv), w)

    def hyper(**kw):
        return bliss_hypergradient(lambda p: 0.5 * (X @ p["w"] - y) ** 2, {"w": w.detach()}, P,
                                   {"w": F}, lambda_z=lam, reg=1e-3, **kw)

    return hyper, H, torch.linalg.solve(H + lam * torch.eye(H.size(0), dtype=H.dtype), F)


def test_damping_gives_regularised_inverse():
    # lambda_z > 0: z converges to (H + lambda_z I)^-1 F, not H^-1 F
    hyper, H, want = damped_ridge(0.05)
    _, _, z = hyper(z_loops=800, lr_z=1.0 / float(torch.linalg.eigvalsh(H).max()))
    torch.testing.assert_close(z["w"], want, rtol=1e-6, atol=1e-9)


def test_auto_step_is_one_over_top_eigenvalue():
    # lr_z="auto": power iteration on the HVP graph finds lambda_max(H + lambda_z I); the
    # Neumann series with 1/lambda_max then converges to the implicit-function hypergradient
    hyper, H, want = damped_ridge(0.05)
    top = float(torch.linalg.eigvalsh(H).max()) + 0.05
    state = {}
    _, _, z = hyper(z_loops=800, lr_z="auto", power_iters=300, power_state=state)
    assert state["lambda_max"] == pytest.approx(top, rel=1e-6)
    assert state["lr_z"] == pytest.approx(1 / top, rel=1e-6)
    torch.testing.assert_close(z["w"], want, rtol=1e-6, atol=1e-9)
    # warm start: one more iteration from the converged vector keeps the estimate
    hyper(z_loops=1, lr_z="auto", power_iters=1, power_state=state)
    assert state["lambda_max"] == pytest.approx(top, rel=1e-6)
    # a fixed step of 2.5 / lambda_max makes the same series diverge (why "auto" exists)
    _, _, zbad = hyper(z_loops=60, lr_z=2.5 / top)
    assert float(zbad["w"].norm()) > 1e3 * float(want.norm())
    with pytest.raises(ValueError, match="lr_z"):
        hyper(lr_z="fast")
    with pytest.raises(ValueError, match="power_iters"):
        hyper(lr_z="auto", power_iters=0)


class _SL(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, labels):
        return self.lm.loss(ids, labels, reduction="sample", backend="torch")


def test_batched_directional_derivative_equals_loop():
    torch.manual_seed(0)
    lm = GPT(GPTConfig(vocab_size=29, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)).double()
    ids = torch.randint(0, 29, (5, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, -3:] = -100
    params = dict(lm.named_parameters())
    z = {k: torch.randn_like(v) for k, v in params.items()}
    wrapper = _SL(lm)
    loss, gz = batched_directional_derivative(
        lambda p: functional_call(wrapper, {"lm." + k: v for k, v in p.items()}, (ids, labels)),
        params, z)
    loop = []
    for i in range(ids.size(0)):
        li = lm.loss(ids[i:i + 1], labels[i:i + 1], reduction="sample")[0]  # fused op, backward
        gi = torch.autograd.grad(li, list(params.values()))
        loop.append(sum((a * z[k]).sum() for k, a in zip(params, gi)))
    torch.testing.assert_close(gz, torch.stack(loop), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, lm.sample_losses(ids, labels), rtol=1e-12, atol=0)


FAST = dict(warmup_steps=4, outer_steps=5, inner_steps=2, batch_size=8, val_batch_size=8,
            checkpoint_every=2)


def test_bliss_scores_synthetic_pool(synthetic):
    pool, target, noise = synthetic()
    sc = build_scorer("bliss", vocab_size=48, seed=0, model=synthetic.TINY, **FAST)
    sc.fit(pool, target, progress=False)
    s = sc.score(pool, batch_size=7)
    assert s.dtype == np.float32 and s.shape == (len(pool),) and np.isfinite(s).all()
    assert len(sc.history) == FAST["outer_steps"]
    assert np.ptp(s) > 0  # the score model moved off its uniform start


def test_bliss_resume_is_bit_identical(synthetic, tmp_path, monkeypatch):
    pool, target, _ = synthetic()
    opts = dict(vocab_size=48, seed=3, model=synthetic.TINY, **FAST)
    full = build_scorer("bliss", **opts).fit(pool, target, progress=False)
    # an interrupted run: dies during outer step 4 (last checkpoint after step 2)
    crashing = build_scorer("bliss", **opts)
    real, calls = bliss_mod.BlissScorer._outer_step, []

    def dying(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated preemption")
        return real(self, *a)

    monkeypatch.setattr(bliss_mod.BlissScorer, "_outer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(pool, target, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(bliss_mod.BlissScorer, "_outer_step", real)
    assert not list(tmp_path.glob("*.tmp"))
    resumed = build_scorer("bliss", **opts).fit(pool, target, checkpoint_dir=tmp_path,
                                                 resume=True, progress=False)
    assert resumed.step == full.step == FAST["outer_steps"]
    np.testing.assert_array_equal(resumed.score(pool), full.score(pool))
    for (k, a), b in zip(full.proxy.state_dict().items(), resumed.proxy.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.history == full.history


def test_bliss_kl_term_and_multi_round(synthetic):
    pool, target, _ = synthetic()
    torch.manual_seed(0)
    tgt_lm = GPT(GPTConfig(vocab_size=48, max_seq_len=12, **synthetic.TINY))
    sc = build_scorer("bliss", vocab_size=48, seed=0, model=synthetic.TINY, gamma=0.1,
                      target_model=tgt_lm, **{**FAST, "outer_steps": 2})
    trained = []
    sel = sc.fit_rounds([pool[:32], pool[32:]], target, fraction=0.25,
                        train_target=lambda s: trained.append(len(s)), progress=False)
    assert [len(i) for i in sel] == [8, 8] and trained == [8, 8]
    assert all(np.all(np.diff(i) > 0) for i in sel)


def test_bliss_option_errors():
    assert bliss_mod.BlissConfig(**bliss_mod.PAPER_DEFAULTS).lr_z == 1e-2
    assert build_scorer("bliss", vocab_size=10, steps=7, lr=0.5).cfg.outer_steps == 7
    with pytest.raises(ValueError, match="alias"):
        build_scorer("bliss", vocab_size=10, steps=7, outer_steps=8)
    with pytest.raises(ValueError, match="unknown option"):
        build_scorer("bliss", vocab_size=10, z_loop=3)
    with pytest.raises(ValueError, match="z_loops"):
        build_scorer("bliss", vocab_size=10, z_loops=0)
    with pytest.raises(ValueError, match="lr_z"):
        build_scorer("bliss", vocab_size=10, lr_z=-1.0)
    with pytest.raises(ValueError, match="or 'auto'"):
        build_scorer("bliss", vocab_size=10, lr_z="fast")
    assert bliss_mod.BlissConfig().lr_z == "auto"
    with pytest.raises(ValueError, match="power_iters"):
        build_scorer("bliss", vocab_size=10, power_iters=0)
    with pytest.raises(ValueError, match=r"BLISS option betas\[0\] must be in"):
        build_scorer("bliss", vocab_size=10, betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="BLISS option weight_decay must be in"):
        build_scorer("bliss", vocab_size=10, weight_decay=-1.0)
