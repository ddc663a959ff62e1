"""thresher.ops.lowrank: sides, projection, refresh, and the fused low-rank Adam step.

Ground truths are float64: torch.linalg.svd for the refresh, torch.optim.AdamW for the
known answer (a square basis that is a permutation: Adam in a permuted basis is Adam), and a
plain transcription of docs/algorithms.md §3 (LoRDO) / §4 (GaLore) for the fused step. A backend's
float32 error must be at most 2x the error of the same computation done eagerly in float32
(the reference backend) plus a tiny floor. The step is an in-place optimizer update, not an
autograd function, so there is no gradcheck; opcheck and torch.compile cover the custom op.
The Triton backend is tested under the interpreter in tests/kernels/test_lowrank.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from thresher.ops import BackendUnavailableError
from thresher.ops._dispatch import extension_available
from thresher.ops import _lowrank_backends, lowrank as L
from thresher.ops.lowrank import (
    METHODS,
    choose_side,
    lowrank_adam_step,
    project,
    project_back,
    refresh_projection,
)

HAVE_C = extension_available("_C", "lowrank_moments")() is None
BACKENDS = ["reference"] + (["cpu"] if HAVE_C else [])
needs_c = pytest.mark.skipif(not HAVE_C, reason="thresher._C (C++ CPU kernels) is not built")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def power_law(p, q, alpha=1.0, seed=0, dtype=torch.float64):
    """A p x q matrix with singular values i^-alpha and random singular vectors."""
    g = gen(seed)
    k = min(p, q)
    U = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(q, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    return ((U * s) @ V.T).to(dtype)


def energy(Q, G, side):
    R = project(G, Q, side)
    return float(R.double().pow(2).sum() / G.double().pow(2).sum())


# ----------------------------------------------------------------------------------------
# Sides and projections
# ----------------------------------------------------------------------------------------


def test_choose_side_is_galores_rule():
    assert choose_side((6, 5)) == "right"
    assert choose_side((5, 5)) == "right"
    assert choose_side((5, 6)) == "left"
    assert choose_side(torch.Size([1, 7])) == "left"
    with pytest.raises(ValueError, match="shape"):
        choose_side((3,))


@pytest.mark.parametrize("side,shape", [("left", (5, 9)), ("right", (9, 5))])
def test_project_and_back(side, shape):
    G = torch.randn(*shape, generator=gen(1), dtype=torch.float64)
    dim = shape[0] if side == "left" else shape[1]
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=gen(2), dtype=torch.float64)).Q
    R = project(G, Q, side)
    torch.testing.assert_close(R, Q.T @ G if side == "left" else G @ Q)
    torch.testing.assert_close(project_back(R, Q, side), G)  # square orthogonal Q: exact inverse
    Qr = Q[:, :3]
    R3 = project(G, Qr, "auto")
    assert R3.shape == ((3, shape[1]) if side == "left" else (shape[0], 3))
    P = project_back(R3, Qr, side)  # the orthogonal projection of G onto span(Q)
    torch.testing.assert_close(project(P, Qr, side), R3)
    with pytest.raises(ValueError, match="Q must have shape"):
        project(G, torch.zeros(dim + 1, 2, dtype=torch.float64), side)
    with pytest.raises(TypeError, match="Q must have dtype"):
        project(G, Qr.float(), side)
    with pytest.raises(ValueError, match="side must be one of"):
        project(G, Qr, "up")


# ----------------------------------------------------------------------------------------
# Refresh
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side,shape", [("left", (60, 90)), ("right", (90, 60))])
def test_refresh_svd_is_exact_top_r(side, shape):
    G = power_law(*shape, alpha=0.7, seed=3)
    Q = refresh_projection(G, 8, side=side, method="svd")
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(Q, U[:, :8] if side == "left" else Vh[:8].T)
    assert abs(energy(Q, G, side) - float((S[:8] ** 2).sum() / (S ** 2).sum())) < 1e-12


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("side,shape", [("left", (120, 200)), ("right", (200, 120))])
def test_refresh_random_captures_svd_energy(side, shape, alpha):
    G = power_law(*shape, alpha=alpha, seed=4, dtype=torch.float32)
    exact = energy(refresh_projection(G, 16, side=side, method="svd"), G, side)
    Q = refresh_projection(G, 16, side=side, method="random", seed=11)
    dim = shape[0] if side == "left" else shape[1]
    assert Q.shape == (dim, 16) and Q.dtype == torch.float32
    torch.testing.assert_close(Q.T @ Q, torch.eye(16), atol=1e-5, rtol=0)
    assert energy(Q, G, side) >= 0.99 * exact
    # without power iterations a flat spectrum loses energy: the iterations matter
    Q0 = refresh_projection(G, 16, side=side, method="random", seed=11, niter=0, oversample=0)
    assert energy(Q0, G, side) < energy(Q, G, side)


def test_refresh_power_warm_start():
    G = power_law(100, 150, alpha=0.8, seed=5)
    Qs = refresh_projection(G, 10, side="left", method="svd")
    # from the exact basis, one iteration stays on the same subspace, column by column
    Qp = refresh_projection(G, 10, side="left", method="power", prev=Qs)
    torch.testing.assert_close(Qp, Qs, atol=1e-8, rtol=0)
    # a nearby gradient: the warm start lands close to its exact subspace
    G2 = G + 1e-3 * torch.randn(100, 150, generator=gen(6), dtype=torch.float64)
    e_exact = energy(refresh_projection(G2, 10, side="left", method="svd"), G2, "left")
    assert energy(refresh_projection(G2, 10, side="left", method="power", prev=Qs), G2,
                  "left") >= 0.999 * e_exact
    # no previous basis: a randomised SVD
    torch.testing.assert_close(refresh_projection(G, 10, side="left", method="power", seed=3),
                               refresh_projection(G, 10, side="left", method="random", seed=3))


def test_refresh_is_deterministic_from_seed():
    G = power_law(64, 80, seed=7, dtype=torch.float32)
    a = refresh_projection(G, 6, side="left", method="random", seed=5, niter=0)
    b = refresh_projection(G.clone(), 6, side="left", method="random", seed=5, niter=0)
    c = refresh_projection(G, 6, side="left", method="random", seed=6, niter=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_refresh_half_precision_input():
    G = power_law(40, 70, seed=8, dtype=torch.bfloat16)
    Q = refresh_projection(G, 5, side="auto", method="random")
    assert Q.dtype == torch.bfloat16 and Q.shape == (40, 5)
    Qf = Q.float()
    torch.testing.assert_close(Qf.T @ Qf, torch.eye(5), atol=2e-2, rtol=0)


def test_refresh_bad_inputs():
    G = torch.randn(6, 8, generator=gen(0))
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(p, q\) = 6\]"):
        refresh_projection(G, 7, side="left")
    with pytest.raises(ValueError, match="rank must be"):
        refresh_projection(G, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        refresh_projection(G, 2, method="qr")
    with pytest.raises(ValueError, match="matrix must be finite"):
        refresh_projection(G.masked_fill(G > 1, math.nan), 2)
    with pytest.raises(ValueError, match="prev must have shape"):
        refresh_projection(G, 2, side="left", method="power", prev=torch.zeros(8, 2))
    with pytest.raises(ValueError, match="matrix must have 2 dimensions"):
        refresh_projection(torch.zeros(3, 4, 5), 2)
    with pytest.raises(ValueError, match="seed must be an int"):
        refresh_projection(G, 2, method="random", seed=1.5)


def test_exact_refresh_runs_lapack_single_threaded_on_cpu(monkeypatch):
    """The exact path's SVD runs on one thread like the other factorisations: on shared cores
    a 2-thread LAPACK SVD took 9-13x longer than a 1-thread one, which made the exact
    refresh measure 0.2-0.7x galore-torch's (docs/kernels.md, "Basis refresh")."""
    seen = []
    svd = torch.linalg.svd

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        refresh_projection(torch.randn(6, 8, generator=gen(0)), 2, method="svd")
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(n)
    assert seen == [1]


def test_meta_tensors_are_refused_by_name():
    def meta(*shape):
        return torch.empty(*shape, device="meta")

    for method in METHODS:
        with pytest.raises(ValueError, match="matrix is a meta tensor"):
            refresh_projection(meta(6, 8), 2, method=method, prev=meta(6, 2))
    with pytest.raises(ValueError, match="param is a meta tensor"):
        lowrank_adam_step(meta(8, 12), meta(8, 12), meta(8, 2), meta(2, 12), meta(2, 12),
                          side="left", step=1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8)


# ----------------------------------------------------------------------------------------
# The fused step
# ----------------------------------------------------------------------------------------


def transcription(W, G, Q, m, v, E, *, side, step, lr, b1, b2, eps, wd, scale, omega, mu):
    """docs/algorithms.md §3/§4 written out in float64 (no thresher code); returns new tensors."""
    W, G, Q, m, v = (t.double() for t in (W, G, Q, m, v))
    lordo = E is not None
    A = G + E.double() if lordo else G
    R = Q.T @ A if side == "left" else A @ Q
    E_new = A - (Q @ R if side == "left" else R @ Q.T) if lordo else None
    m = b1 * m + (1 - b1) * R
    v = b2 * v + (1 - b2) * R * R
    mh, vh = m / (1 - b1 ** step), v / (1 - b2 ** step)
    N = mh / (vh.sqrt() + eps)
    low = Q @ N if side == "left" else N @ Q.T
    W = W * (1 - lr * wd)
    if not lordo:
        return W - lr * scale * low, m, v, None
    D = vh.mean(0, keepdim=True).sqrt() if side == "left" else vh.mean(1, keepdim=True).sqrt()
    W = W - lr * ((1 - omega) * G / (mu * (D + eps)) + omega * scale * low)
    return W, m, v, E_new


def make_problem(p, q, r, side, dtype, seed, lordo):
    g = gen(seed)
    W = torch.randn(p, q, generator=g)
    G = torch.randn(p, q, generator=g)
    dim = p if side == "left" else q
    Q = torch.linalg.qr(torch.randn(dim, r, generator=g, dtype=torch.float64)).Q.float()
    low = (r, q) if side == "left" else (p, r)
    m = 0.1 * torch.randn(low, generator=g)
    v = 0.05 * torch.rand(low, generator=g)
    E = 0.3 * torch.randn(p, q, generator=g) if lordo else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (W, G, Q, m, v, E)]


HP = dict(step=3, lr=0.05, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, scale=0.25, omega=0.4, mu=1.5)


def run_step(backend, W, G, Q, m, v, E, side, hp=HP):
    W, m, v = W.clone(), m.clone(), v.clone()
    E = None if E is None else E.clone()
    lordo = E is not None
    lowrank_adam_step(W, G, Q, m, v, side=side, step=hp["step"], lr=hp["lr"], beta1=hp["b1"],
                      beta2=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"], scale=hp["scale"],
                      error=E, omega=hp["omega"] if lordo else 0.0, mu=hp["mu"], backend=backend)
    return W, m, v, E


def within(got, truth, eager, what):
    err = float((got.double() - truth).abs().max())
    eager_err = float((eager.double() - truth).abs().max())
    bound = 2 * eager_err + 2.0 ** -20 * max(1.0, float(truth.abs().max()))
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})"


SHAPES = [("left", 7, 13, 3), ("right", 13, 7, 3), ("left", 33, 1100, 16), ("right", 1037, 40, 8),
          ("left", 1, 9, 1), ("right", 5, 5, 5)]


@pytest.mark.parametrize("lordo", [False, True], ids=["galore", "lordo"])
@pytest.mark.parametrize("side,p,q,r", SHAPES, ids=[f"{s}-{p}x{q}-r{r}" for s, p, q, r in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_matches_float64_transcription(backend, side, p, q, r, lordo):
    W, G, Q, m, v, E = make_problem(p, q, r, side, torch.float32, p * 1000 + q, lordo)
    hp = {k: HP[k] for k in ("step", "lr", "b1", "b2", "eps", "wd", "scale", "omega", "mu")}
    truth = transcription(W, G, Q, m, v, E, side=side, **hp)
    eager = run_step("reference", W, G, Q, m, v, E, side)  # PyTorch eager in float32
    got = run_step(backend, W, G, Q, m, v, E, side)
    for name, a, t, e in zip(("param", "exp_avg", "exp_avg_sq", "error"), got, truth, eager):
        if t is None:
            assert a is None
            continue
        assert a.dtype == torch.float32
        within(a, t, e, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lordo", [False, True], ids=["galore", "lordo"])
def test_fused_step_float64_is_the_transcription(backend, lordo):
    W, G, Q, m, v, E = make_problem(11, 17, 4, "left", torch.float64, 9, lordo)
    truth = transcription(W, G, Q, m, v, E, side="left", **HP)
    got = run_step(backend, W, G, Q, m, v, E, "left")
    for a, t in zip(got, truth):
        if t is not None:
            torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("basis", ["identity", "permutation"])
def test_known_answer_full_rank_basis_is_adamw(backend, side, basis):
    """A square basis that is a permutation (or the identity) commutes with Adam's
    elementwise maths, so lowrank_adam_step with scale 1 must follow torch.optim.AdamW."""
    p, q = (6, 9) if side == "left" else (9, 6)
    dim = min(p, q)
    Q = torch.eye(dim, dtype=torch.float64)
    if basis == "permutation":
        Q = Q[torch.randperm(dim, generator=gen(3))]
    W0 = torch.randn(p, q, generator=gen(4), dtype=torch.float64)
    ref = W0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=0.03, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05,
                            foreach=False)
    W = W0.clone()
    low = (dim, q) if side == "left" else (p, dim)
    m = torch.zeros(low, dtype=torch.float64)
    v = torch.zeros(low, dtype=torch.float64)
    for t in range(1, 8):
        G = torch.randn(p, q, generator=gen(100 + t), dtype=torch.float64)
        ref.grad = G.clone()
        opt.step()
        lowrank_adam_step(W, G, Q, m, v, side=side, step=t, lr=0.03, beta1=0.8, beta2=0.95,
                          eps=1e-8, weight_decay=0.05, scale=1.0, backend=backend)
        torch.testing.assert_close(W, ref.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lordo_omega_one_is_galore_plus_error_feedback(backend):
    W, G, Q, m, v, E = make_problem(9, 14, 3, "left", torch.float64, 21, lordo=True)
    hp = dict(HP, omega=1.0)
    got = run_step(backend, W, G, Q, m, v, E, "left", hp)
    # GaLore's step on the gradient plus the error
    ga = run_step(backend, W, G + E, Q, m, v, None, "left", dict(hp, omega=0.0))
    for a, b in zip(got[:3], ga[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # error feedback conserves mass: what was projected plus the new error is G + E
    R = project(G + E, Q, "left")
    torch.testing.assert_close(project_back(R, Q, "left") + got[3], G + E)


@needs_c
def test_cpu_kernel_large_multithreaded_and_rows_strided_param():
    # a parameter that is a row slice of a wider buffer (row stride > q): kernels take strides
    buf = torch.randn(300, 700, generator=gen(30))
    G = torch.randn(300, 500, generator=gen(31))
    Q = torch.linalg.qr(torch.randn(300, 20, generator=gen(32))).Q
    m = torch.zeros(20, 500)
    v = torch.zeros(20, 500)
    E = torch.zeros(300, 500)
    outs = {}
    for be in ("reference", "cpu"):
        b, mm, vv, ee = buf.clone(), m.clone(), v.clone(), E.clone()
        W = b[:, 100:600]
        lowrank_adam_step(W, G, Q, mm, vv, side="left", step=1, lr=0.1, beta1=0.9, beta2=0.999,
                          eps=1e-8, error=ee, omega=0.5, backend=be)
        outs[be] = (b, mm, vv, ee)
    for a, b in zip(outs["reference"], outs["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(outs["cpu"][0][:, :100], buf[:, :100])  # outside the view: untouched
    assert torch.equal(outs["cpu"][0][:, 600:], buf[:, 600:])


def test_bf16_goes_to_the_reference_on_cpu():
    W, G, Q, m, v, _ = make_problem(8, 12, 2, "left", torch.bfloat16, 40, False)
    assert L.DISPATCH.select("auto", W.device, W.dtype, row_contiguous=True) == "reference"
    truth = transcription(W, G, Q, m, v, None, side="left", **HP)
    got = run_step("auto", W, G, Q, m, v, None, "left")
    torch.testing.assert_close(got[0].double(), truth[0], rtol=2e-2, atol=2e-2)
    if HAVE_C:
        with pytest.raises(BackendUnavailableError, match="supports dtypes float32, float64"):
            run_step("cpu", W, G, Q, m, v, None, "left")


def test_non_contiguous_param_auto_uses_reference_and_named_backend_refuses():
    W = torch.randn(12, 8, generator=gen(50)).T  # 8 x 12, column-major
    G = torch.randn(8, 12, generator=gen(51))
    Q = torch.linalg.qr(torch.randn(8, 3, generator=gen(52))).Q
    m, v = torch.zeros(3, 12), torch.zeros(3, 12)
    W_ref = W.contiguous()
    lowrank_adam_step(W, G, Q, m, v, side="left", step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    lowrank_adam_step(W_ref, G, Q, torch.zeros(3, 12), torch.zeros(3, 12), side="left", step=1,
                      lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    torch.testing.assert_close(W, W_ref)
    if HAVE_C:
        with pytest.raises(BackendUnavailableError, match="contiguous rows"):
            lowrank_adam_step(W, G, Q, m, v, side="left", step=1, lr=0.1, beta1=0.9, beta2=0.99,
                              eps=1e-8, backend="cpu")


def test_triton_and_cuda_refuse_cpu_tensors_with_reasons():
    W, G, Q, m, v, _ = make_problem(8, 12, 2, "left", torch.float32, 60, False)
    for be in ("triton", "cuda"):
        with pytest.raises(BackendUnavailableError, match=f"'{be}' runs on"):
            run_step(be, W, G, Q, m, v, None, "left")


def _bad(**over):
    W, G, Q, m, v, E = make_problem(8, 12, 2, "left", torch.float32, 70, True)
    kw = dict(param=W, grad=G, Q=Q, exp_avg=m, exp_avg_sq=v, side="left", step=1, lr=0.1,
              beta1=0.9, beta2=0.99, eps=1e-8)
    kw.update(over)
    args = [kw.pop(k) for k in ("param", "grad", "Q", "exp_avg", "exp_avg_sq")]
    lowrank_adam_step(*args, **kw)


@pytest.mark.parametrize("over,exc,msg", [
    (dict(grad=torch.zeros(8, 11)), ValueError, r"grad must have shape \(8, 12\)"),
    (dict(grad=torch.zeros(8, 12, dtype=torch.float64)), TypeError, "grad must have dtype float32"),
    (dict(Q=torch.zeros(12, 2)), ValueError, r"Q must have shape \(8, \*\)"),
    (dict(exp_avg=torch.zeros(3, 12)), ValueError, r"exp_avg must have shape \(2, 12\)"),
    (dict(exp_avg_sq=torch.zeros(12, 2).T), ValueError, "exp_avg_sq must be contiguous"),
    (dict(error=torch.zeros(8, 13)), ValueError, r"error must have shape \(8, 12\)"),
    (dict(param=torch.zeros(8, 12, dtype=torch.int64)), TypeError, "param must have dtype"),
    (dict(param="w"), TypeError, "param must be a torch.Tensor"),
    (dict(step=0), ValueError, "step must be an int >= 1"),
    (dict(step=1.5), ValueError, "step must be an int >= 1"),
    (dict(lr=-1.0), ValueError, "lr must be in"),
    (dict(beta1=1.0), ValueError, r"beta1 must be in \[0.0, 1.0\)"),
    (dict(beta2=-0.1), ValueError, "beta2 must be in"),
    (dict(eps="x"), TypeError, "eps must be a number"),
    (dict(omega=0.5), ValueError, "omega=0.5 weights LoRDO's full-rank term"),
    (dict(error=torch.zeros(8, 12), omega=1.5), ValueError, "omega must be in"),
    (dict(error=torch.zeros(8, 12), mu=0.0), ValueError, r"mu must be in \(0.0"),
    (dict(side="top"), ValueError, "side must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    # infinite / NaN hyper-parameters (each made every update inf or NaN)
    (dict(lr=math.inf), ValueError, "lr must be a finite number, got inf"),
    (dict(lr=math.nan), ValueError, "lr must be a finite number, got nan"),
    (dict(eps=math.inf), ValueError, "eps must be a finite number"),
    (dict(weight_decay=math.inf), ValueError, "weight_decay must be a finite number"),
    (dict(scale=-math.inf), ValueError, "scale must be a finite number"),
    (dict(beta2=math.nan), ValueError, "beta2 must be a finite number"),
    (dict(error=torch.zeros(8, 12), omega=0.5, mu=math.inf), ValueError,
     "mu must be a finite number"),
    (dict(error=torch.zeros(8, 12), omega=math.nan), ValueError, "omega must be a finite number"),
    # a basis wider than the matrix's smaller side (8): more directions than exist
    (dict(Q=torch.zeros(8, 9), exp_avg=torch.zeros(9, 12), exp_avg_sq=torch.zeros(9, 12)),
     ValueError, r"Q must have between 1 and min\(p, q\) = 8 columns"),
    (dict(Q=torch.zeros(8, 0), exp_avg=torch.zeros(0, 12), exp_avg_sq=torch.zeros(0, 12)),
     ValueError, "Q must have between 1 and"),
    (dict(step=torch.ones((), device="meta")), ValueError, "step is a meta tensor"),
])
def test_step_bad_inputs(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _bad(**over)


def test_step_accepts_tensor_step_and_auto_side():
    W, G, Q, m, v, _ = make_problem(8, 12, 2, "left", torch.float64, 80, False)
    a = run_step("reference", W, G, Q, m, v, None, "left")
    W2, m2, v2 = W.clone(), m.clone(), v.clone()
    lowrank_adam_step(W2, G, Q, m2, v2, side="auto", step=torch.tensor(3.0), lr=HP["lr"],
                      backend="reference",
                      beta1=HP["b1"], beta2=HP["b2"], eps=HP["eps"], weight_decay=HP["wd"],
                      scale=HP["scale"])
    assert torch.equal(W2, a[0]) and torch.equal(m2, a[1]) and torch.equal(v2, a[2])


# ----------------------------------------------------------------------------------------
# Custom op: opcheck and torch.compile
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lordo", [False, True], ids=["galore", "lordo"])
def test_opcheck(lordo):
    W, G, Q, m, v, E = make_problem(6, 10, 2, "left", torch.float32, 90, lordo)
    backend = "cpu" if HAVE_C else "reference"
    args = (W, G, Q, m, v, E, "left", 2, 0.1, 0.9, 0.99, 1e-8, 0.01, 0.5,
            0.3 if lordo else 0.0, 1.0, backend)
    torch.library.opcheck(_lowrank_backends.lowrank_adam_step_op, args)


def test_torch_compile_fullgraph():
    W, G, Q, m, v, E = make_problem(6, 10, 2, "left", torch.float32, 91, True)
    expect = run_step("auto", W, G, Q, m, v, E, "left")

    def f(W, G, Q, m, v, E):
        lowrank_adam_step(W, G, Q, m, v, side="left", step=HP["step"], lr=HP["lr"],
                          beta1=HP["b1"], beta2=HP["b2"], eps=HP["eps"], weight_decay=HP["wd"],
                          scale=HP["scale"], error=E, omega=HP["omega"], mu=HP["mu"])
        return W

    W2, m2, v2, E2 = W.clone(), m.clone(), v.clone(), E.clone()
    torch.compile(f, fullgraph=True, backend="eager")(W2, G, Q, m2, v2, E2)
    for a, b in zip(expect, (W2, m2, v2, E2)):
        torch.testing.assert_close(a, b)
