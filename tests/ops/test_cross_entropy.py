"""Tests for thresher.ops.cross_entropy (weighted CE and the fused linear variant).

Ground truth is float64; a backend's error must be at most 2x the error of the same-dtype
eager PyTorch computation plus a tiny absolute floor (docs/architecture.md, "Testing without a GPU"). The Triton
kernels' interpreter runs and AOT compilation are in tests/kernels/test_cross_entropy.py.
"""
from __future__ import annotations

import math
import re
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thresher
from thresher.ops import BackendUnavailableError, _native

BACKENDS = ["reference"] + (["cpu"] if _native.cpu_ext() is not None else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "sample", "sum", "mean"]


def test_cpu_extension_is_built():
    # CI builds the extension (THRESHER_STRICT_BUILD=1); a silent reference-only run would
    # hide every CPU-kernel test below.
    assert _native.cpu_ext() is not None, _native.native_status()


# ---------------------------------------------------------------------------------------
# An independent formula (plain torch ops), run in float64 for truth and in the input dtype
# for "what eager PyTorch would get".
# ---------------------------------------------------------------------------------------


def formula(x, target, sw=None, tw=None, ii=-100, reduction="mean", eps=0.0, zl=0.0):
    lse = torch.logsumexp(x, -1)
    logp = x - lse.unsqueeze(-1)
    valid = target != ii
    tt = torch.where(valid, target, torch.zeros_like(target))
    nll = -logp.gather(-1, tt.unsqueeze(-1)).squeeze(-1)
    loss = (1 - eps) * nll - eps * logp.mean(-1) + zl * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    t2 = valid.reshape(target.shape[0], -1).to(x.dtype)
    tok = t2 if tw is None else t2 * tw.reshape(t2.shape).to(x.dtype)
    w = tok if sw is None else tok * sw.to(x.dtype)[:, None]
    l2 = loss.reshape(t2.shape)
    if reduction == "none":
        return (l2 * w).reshape(target.shape)
    if reduction == "sample":
        out = (l2 * tok).sum(1) / tok.sum(1).clamp_min(1e-30)
        return out if sw is None else out * sw.to(x.dtype)
    if reduction == "sum":
        return (l2 * w).sum()
    return (l2 * w).sum() / w.sum().clamp_min(1e-30)


def floor_for(dtype, truth):
    return 4 * torch.finfo(dtype).eps * max(1.0, float(truth.abs().max()) if truth.numel() else 1.0)


def assert_within_eager(name, got, truth, eager, dtype):
    if truth.numel() == 0:
        assert got.numel() == 0
        return
    err = float((got.detach().double() - truth).abs().max())
    eager_err = float((eager.double() - truth).abs().max())
    bound = 2 * eager_err + floor_for(dtype, truth)
    assert err <= bound, f"{name}: error {err:.3e} > 2 x eager {eager_err:.3e} + floor"


def make_case(B, T, V, dtype, seed=0, ignore_frac=0.2, scale=3.0, weights=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, V, (B, T), generator=g)
    t[torch.rand(B, T, generator=g) < ignore_frac] = -100
    sw = torch.rand(B, generator=g, dtype=torch.float64).to(dtype) if weights else None
    tw = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) if weights else None
    return x, t, sw, tw


def check_against_truth(fn, x, t, sw, tw, reduction, eps, zl, dtype, upstream_seed=1):
    """Loss and d(loss . u)/dlogits for a random upstream u vs truth and eager."""
    xs = x.detach().clone().requires_grad_()
    out = fn(xs, t, sample_weight=sw, token_weight=tw, reduction=reduction,
             label_smoothing=eps, z_loss=zl)
    u = torch.rand(out.shape, generator=torch.Generator().manual_seed(upstream_seed),
                   dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, xs, u.to(out.dtype)) if out.numel() else (torch.zeros_like(xs),)

    x64 = x.detach().double().requires_grad_()
    truth = formula(x64, t, sw, tw, -100, reduction, eps, zl)
    (g64,) = torch.autograd.grad(truth, x64, u) if truth.numel() else (torch.zeros_like(x64),)

    xe = x.detach().clone().requires_grad_()
    eager = formula(xe, t, sw, tw, -100, reduction, eps, zl)
    (ge,) = torch.autograd.grad(eager, xe, u.to(eager.dtype)) if eager.numel() else (torch.zeros_like(xe),)

    assert out.shape == truth.shape
    assert_within_eager("loss", out, truth.detach(), eager.detach(), dtype)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert_within_eager("grad", gx, g64, ge, dtype)


# ---------------------------------------------------------------------------------------
# weighted_cross_entropy numerics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps,zl", [(0.0, 0.0), (0.1, 1e-3)])
def test_weighted_ce_matches_truth(backend, dtype, reduction, eps, zl):
    x, t, sw, tw = make_case(3, 5, 1003, dtype)
    fn = lambda *a, **k: thresher.weighted_cross_entropy(*a, backend=backend, **k)  # noqa: E731
    check_against_truth(fn, x, t, sw, tw, reduction, eps, zl, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 7, 50257, 128256])
def test_awkward_vocab_sizes(backend, V):
    B, T = (1, 2) if V > 1000 else (2, 3)
    for dtype in (torch.float32, torch.bfloat16):
        x, t, sw, tw = make_case(B, T, V, dtype, ignore_frac=0.0)
        fn = lambda *a, **k: thresher.weighted_cross_entropy(*a, backend=backend, **k)  # noqa: E731
        check_against_truth(fn, x, t, sw, None, "mean", 0.05, 1e-4, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_logits_single_row_and_sample_reduction(backend):
    x, t, sw, _ = make_case(1, 1, 333, torch.float32, ignore_frac=0.0)
    x2, t2 = x.reshape(1, 333), t.reshape(1)
    out = thresher.weighted_cross_entropy(x2, t2, sample_weight=sw, reduction="sample", backend=backend)
    truth = formula(x2.double(), t2, sw, None, reduction="sample")
    assert out.shape == (1,)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    x = torch.randn(0, 4, 11, requires_grad=True)
    t = torch.zeros(0, 4, dtype=torch.long)
    out = thresher.weighted_cross_entropy(x, t, sample_weight=torch.ones(0), reduction=reduction,
                                          backend=backend)
    expected_shape = {"none": (0, 4), "sample": (0,), "sum": (), "mean": ()}[reduction]
    assert out.shape == expected_shape
    assert out.sum().item() == 0.0
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(backend, reduction):
    x = torch.randn(2, 3, 17, requires_grad=True)
    t = torch.full((2, 3), -100)
    out = thresher.weighted_cross_entropy(x, t, reduction=reduction, backend=backend)
    assert torch.isfinite(out).all() and (out == 0).all()  # mean is 0, not NaN
    out.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    base = torch.randn(4, 37, 2 * 513, dtype=torch.float64)
    x = base[..., ::2].float()               # strided last dim -> copied by the op
    y = base.float()[:, ::3, :513]            # strided rows, contiguous last dim -> no copy
    for logits in (x, y, base.float().transpose(0, 1)[:, :, :513]):
        t = torch.randint(0, logits.size(-1), logits.shape[:-1])
        fn = lambda *a, **k: thresher.weighted_cross_entropy(*a, backend=backend, **k)  # noqa: E731
        check_against_truth(fn, logits, t, None, None, "mean", 0.0, 0.0, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_target(backend):
    x, t, sw, tw = make_case(2, 6, 50, torch.float32)
    t = torch.where(t == -100, torch.full_like(t, 7), t)
    out = thresher.weighted_cross_entropy(x, t.int(), ignore_index=7, backend=backend)
    truth = formula(x.double(), t, ii=7)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_cross_entropy(backend):
    # With no weights, thresher's "mean"/"none" are F.cross_entropy's (label smoothing too).
    x, t, _, _ = make_case(4, 8, 300, torch.float32)
    x, t = x.reshape(32, 300), t.reshape(32)
    for red in ("mean", "none", "sum"):
        ours = thresher.weighted_cross_entropy(x, t, reduction=red, label_smoothing=0.1, backend=backend)
        theirs = F.cross_entropy(x.double(), t, reduction=red, label_smoothing=0.1)
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_and_retain_graph(backend):
    # The fused path hands its buffer to the first backward; a retained graph's second
    # backward must recompute, and a non-unit upstream must scale.
    x, t, sw, _ = make_case(2, 4, 101, torch.float32)
    x = x.requires_grad_()
    loss = thresher.weighted_cross_entropy(x, t, sample_weight=sw, backend=backend)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3.0, x)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g3, 3 * g1, rtol=1e-5, atol=1e-7)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(formula(x64, t, sw), x64)
    torch.testing.assert_close(g1.double(), g64, rtol=1e-4, atol=1e-6)


def test_no_grad_returns_plain_tensor_and_keeps_nothing():
    x = torch.randn(3, 5, 40, requires_grad=True)
    t = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        out = thresher.weighted_cross_entropy(x, t)
    assert out.grad_fn is None
    h = torch.randn(15, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    with torch.no_grad():
        out = thresher.linear_weighted_cross_entropy(h, w, t.reshape(-1), chunk_size=4)
    assert out.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([[1, -100, 5], [0, 2, 3]])
    sw = torch.rand(2, dtype=torch.float64, generator=g)
    tw = torch.rand(2, 3, dtype=torch.float64, generator=g)
    for red in REDUCTIONS:
        fn = lambda x: thresher.weighted_cross_entropy(  # noqa: E731
            x, t, sample_weight=sw, token_weight=tw, reduction=red, label_smoothing=0.1,
            z_loss=0.01, backend=backend)
        assert torch.autograd.gradcheck(fn, (x,))
    h = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    tl = torch.tensor([1, 6, -100, 0, 3, 3])
    for red in REDUCTIONS:
        fn = lambda h, w, b: thresher.linear_weighted_cross_entropy(  # noqa: E731
            h, w, tl, bias=b, token_weight=tw.reshape(-1), reduction=red, label_smoothing=0.1,
            z_loss=0.01, chunk_size=4, backend=backend)
        assert torch.autograd.gradcheck(fn, (h, w, b))


# ---------------------------------------------------------------------------------------
# linear_weighted_cross_entropy
# ---------------------------------------------------------------------------------------


def linear_truth(h, w, b, t, **kw):
    logits = h.double() @ w.double().t()
    if b is not None:
        logits = logits + b.double()
    return formula(logits, t, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_linear_matches_truth(backend, reduction, chunk_size):
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 6, 16, 301
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 2] = -100
    sw, tw = torch.rand(B, generator=g), torch.rand(B, T, generator=g)
    out = thresher.linear_weighted_cross_entropy(
        h, w, t, bias=b, sample_weight=sw, token_weight=tw, reduction=reduction,
        label_smoothing=0.1, z_loss=1e-3, chunk_size=chunk_size, backend=backend)
    u = torch.rand(out.shape, generator=g)
    grads = torch.autograd.grad(out, (h, w, b), u)
    h64, w64, b64 = (p.detach().double().requires_grad_() for p in (h, w, b))
    truth = linear_truth(h64, w64, b64, t, sw=sw.double(), tw=tw.double(), reduction=reduction,
                         eps=0.1, zl=1e-3)
    grads64 = torch.autograd.grad(truth, (h64, w64, b64), u.double())
    torch.testing.assert_close(out.double(), truth, rtol=2e-5, atol=2e-5)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bf16_grad_weight_accumulates_in_fp32(backend):
    g = torch.Generator().manual_seed(6)
    N, H, V = 64, 32, 257
    h = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.2).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    out = thresher.linear_weighted_cross_entropy(h, w, t, chunk_size=8, backend=backend)
    gh, gw = torch.autograd.grad(out, (h, w))
    assert gw.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = linear_truth(h64, w64, None, t)
    th, tw_ = torch.autograd.grad(truth, (h64, w64))
    # eager bf16: materialised logits, F.cross_entropy, autograd
    he, we = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    eager = F.cross_entropy(he @ we.t(), t)
    eh, ew = torch.autograd.grad(eager, (he, we))
    assert_within_eager("loss", out, truth.detach(), eager.detach(), torch.bfloat16)
    assert_within_eager("grad_hidden", gh, th, eh, torch.bfloat16)
    assert_within_eager("grad_weight", gw, tw_, ew, torch.bfloat16)


def test_linear_frozen_head_only_hidden_grad():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(50, 8)  # frozen
    t = torch.randint(0, 50, (10,))
    out = thresher.linear_weighted_cross_entropy(h, w, t, reduction="sum")
    (gh,) = torch.autograd.grad(out, h)
    h64 = h.detach().double().requires_grad_()
    (th,) = torch.autograd.grad(linear_truth(h64, w, None, t, reduction="sum"), h64)
    torch.testing.assert_close(gh.double(), th, rtol=1e-5, atol=1e-5)


def test_linear_retain_graph_and_upstream():
    h = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (12,))
    out = thresher.linear_weighted_cross_entropy(h, w, t, chunk_size=5)
    g1 = torch.autograd.grad(out, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(2.5 * out, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(2.5 * a, b, rtol=1e-5, atol=1e-6)


def test_linear_peak_memory_is_chunk_sized():
    # The op must never hold the (N, V) logits: with chunk_size=c the live set is one
    # (c, V) buffer plus the gradients. Count bytes through the CPU allocator's profiler.
    N, H, V, c = 2048, 32, 4000, 128
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = thresher.linear_weighted_cross_entropy(h, w, t, chunk_size=c)
        torch.autograd.grad(out, (h, w))
    big = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    full_logits = N * V * 4
    assert max(big) < full_logits / 4, f"largest allocation {max(big)} vs (N, V) {full_logits}"


# ---------------------------------------------------------------------------------------
# Property tests: the C++ kernel agrees with the reference on random problems
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif("cpu" not in BACKENDS, reason="thresher._C not built: nothing to compare")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 9), v=st.integers(1, 700), dtype=st.sampled_from(DTYPES + [torch.float64]),
    reduction=st.sampled_from(REDUCTIONS), eps=st.sampled_from([0.0, 0.2]),
    zl=st.sampled_from([0.0, 1e-2]), scale=st.sampled_from([0.1, 5.0, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_matches_reference(n, v, dtype, reduction, eps, zl, scale, seed):
    x, t, sw, tw = make_case(max(n, 0), 1, v, dtype, seed=seed, scale=scale)
    x, t, tw = x.reshape(n, v), t.reshape(n), tw.reshape(n)
    outs = []
    for be in ("reference", "cpu"):
        xs = x.clone().requires_grad_()
        out = thresher.weighted_cross_entropy(xs, t, sample_weight=sw, token_weight=tw,
                                              reduction=reduction, label_smoothing=eps,
                                              z_loss=zl, backend=be)
        (g,) = torch.autograd.grad(out.sum(), xs) if n else (torch.zeros_like(xs),)
        outs.append((out.double(), g.double()))
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-2)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, scale))


# ---------------------------------------------------------------------------------------
# Custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# overwrite_logits=True: the gradient is written over the logits (sum/mean, eager)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_overwrite_logits_matches_truth_and_holds_gradient(backend, dtype, reduction):
    x, t, sw, tw = make_case(3, 5, 37, dtype, seed=7)
    fn = lambda *a, **k: thresher.weighted_cross_entropy(*a, backend=backend, **k)  # noqa: E731
    plain = x.detach().clone().requires_grad_()
    loss_ref = fn(plain, t, sample_weight=sw, token_weight=tw, reduction=reduction,
                  label_smoothing=0.1, z_loss=1e-3)
    (g_ref,) = torch.autograd.grad(loss_ref, plain)

    logits = x.detach().clone().requires_grad_()
    loss = fn(logits, t, sample_weight=sw, token_weight=tw, reduction=reduction,
              label_smoothing=0.1, z_loss=1e-3, overwrite_logits=True)
    assert torch.equal(loss.detach(), loss_ref.detach())
    # the forward already wrote the (upstream = 1) gradient over the logits
    assert torch.equal(logits.detach(), g_ref)
    (g,) = torch.autograd.grad(loss * 2.5, logits)  # upstream != 1 scales it in place
    torch.testing.assert_close(g, g_ref * 2.5, rtol=2 * torch.finfo(dtype).eps, atol=0)
    # and against float64 truth, like every other path
    check_against_truth(
        lambda *a, **k: fn(*a, overwrite_logits=True, **k), x, t, sw, tw, reduction, 0.1,
        1e-3, dtype)


def test_overwrite_logits_refuses_a_graph_that_saved_the_logits():
    h = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    logits = torch.exp(h)  # exp saves its output for backward
    t = torch.randint(0, 9, (4,))
    loss = thresher.weighted_cross_entropy(logits, t, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_overwrite_logits_second_backward_raises():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = thresher.weighted_cross_entropy(logits, torch.randint(0, 9, (4,)),
                                           overwrite_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_overwrite_logits_without_grad_leaves_logits_alone():
    logits = torch.randn(4, 9)
    before = logits.clone()
    thresher.weighted_cross_entropy(logits, torch.randint(0, 9, (4,)), overwrite_logits=True)
    assert torch.equal(logits, before)


def _opcheck_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 13, generator=g)
    t = torch.tensor([0, 3, -100, 12, 5])
    coef = torch.rand(5, generator=g)
    h, w, b = torch.randn(5, 4, generator=g), torch.randn(13, 4, generator=g), torch.randn(13, generator=g)
    return x, t, coef, h, w, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, t, coef, h, w, b = _opcheck_inputs()
    _, lse, _ = torch.ops.thresher.weighted_ce_fwd(x, t, None, -100, 0.1, 0.01, 0.0, backend)
    cases = [
        (torch.ops.thresher.weighted_ce_fwd.default, (x, t, coef, -100, 0.1, 0.01, 0.0, backend)),
        (torch.ops.thresher.weighted_ce_fwd.default, (x, t, None, -100, 0.0, 0.0, 2.0, backend)),
        (torch.ops.thresher.weighted_ce_bwd.default,
         (x, t, lse, coef, -100, 0.1, 0.01, 0.0, backend)),
        (torch.ops.thresher.weighted_ce_fwd_overwrite.default,
         (x.clone(), t, coef, -100, 0.1, 0.01, 3.0, backend)),
        (torch.ops.thresher.linear_weighted_ce_fwd.default,
         (h, w, b, t, coef, [True, True, True], -100, 0.1, 0.0, 2.0, 2, backend)),
        (torch.ops.thresher.linear_weighted_ce_bwd.default,
         (h, w, None, t, lse, coef, [True, False, False], -100, 0.0, 0.0, 0.0, 3, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_weighted_ce():
    torch._dynamo.reset()
    x, t, sw, tw = make_case(2, 3, 50, torch.float32)

    def f(x, t, sw, tw):
        return thresher.weighted_cross_entropy(x, t, sample_weight=sw, token_weight=tw,
                                               label_smoothing=0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = f(xs, t, sw, tw), compiled(xc, t, sw, tw)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(torch.autograd.grad(comp, xc)[0], torch.autograd.grad(eager, xs)[0])


def test_torch_compile_fullgraph_linear_ce():
    torch._dynamo.reset()
    h = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    t = torch.randint(0, 40, (12,))

    def f(h, w, t):
        return thresher.linear_weighted_cross_entropy(h, w, t, reduction="sample", chunk_size=5)

    compiled = torch.compile(f, fullgraph=True)  # inductor: the real compile path
    eager, comp = f(h, w, t), compiled(h, w, t)
    torch.testing.assert_close(comp, eager)
    ge = torch.autograd.grad(eager.sum(), (h, w))
    gc = torch.autograd.grad(comp.sum(), (h, w))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# Dispatch, extension loading, OpenMP
# ---------------------------------------------------------------------------------------


def test_backend_errors_list_every_reason():
    x, t = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(BackendUnavailableError) as e:
        thresher.weighted_cross_entropy(x, t, backend="cuda")
    assert "runs on cuda" in str(e.value)
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(BackendUnavailableError) as e:
            thresher.weighted_cross_entropy(x.double(), t, backend="triton")
        msg = str(e.value)
        assert "runs on cuda" in msg and "float64" in msg  # both reasons, not just the first
    with pytest.raises(ValueError, match="backend must be one of"):
        thresher.weighted_cross_entropy(x, t, backend="gpu")


def test_missing_extension_falls_back_once_with_reason(monkeypatch):
    monkeypatch.setitem(_native._modules, "_C", None)
    monkeypatch.setitem(_native._reasons, "_C", "thresher._C could not be imported: simulated")
    monkeypatch.setattr(_native, "_warned", set())
    x, t = torch.randn(3, 9), torch.tensor([0, 1, 2])
    with pytest.warns(RuntimeWarning, match="simulated"):
        a = thresher.weighted_cross_entropy(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = thresher.weighted_cross_entropy(x, t)  # said once only
    torch.testing.assert_close(a, b)
    with pytest.raises(BackendUnavailableError, match="simulated"):
        thresher.weighted_cross_entropy(x, t, backend="cpu")
    assert "simulated" in thresher.native_status()["_C"]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="thresher._C not built")
def test_openmp_runtime_shared_with_torch():
    # A kernel call between two PyTorch parallel ops: results right, and (where the wheel
    # ships libgomp.so.1) one OpenMP runtime in the process, not two competing pools.
    a = torch.randn(512, 512)
    ref = a @ a
    x, t = torch.randn(256, 4096), torch.randint(0, 4096, (256,))
    loss = thresher.weighted_cross_entropy(x, t, backend="cpu")
    torch.testing.assert_close(a @ a, ref)
    torch.testing.assert_close(loss.double(), formula(x.double(), t), rtol=1e-5, atol=1e-5)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.exists(os.path.join(torch_lib, "libgomp.so.1")):
        with open("/proc/self/maps") as f:
            gomps = {line.split()[-1] for line in f if "libgomp" in line}
        assert len(gomps) == 1, gomps


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

X, T = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logits=X.long()), TypeError, "logits must have dtype"),
        (dict(logits=[1.0]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.randn(10)), ValueError, "logits must have 2 or 3 dimensions"),
        (dict(target=T.float()), TypeError, "target must have dtype"),
        (dict(target=T[:, :2]), ValueError, r"target must have shape \(2, 3\)"),
        (dict(target=T.to("meta")), ValueError, "target must be on cpu"),
        (dict(target=torch.full((2, 3), 10)), ValueError, r"target values must be in \[0, 10\)"),
        (dict(target=torch.full((2, 3), -5)), ValueError, "found -5"),
        (dict(sample_weight=torch.ones(3)), ValueError, r"sample_weight must have shape \(2\)"),
        (dict(sample_weight=torch.tensor([1.0, float("nan")])), ValueError, "sample_weight must be finite and non-negative"),
        (dict(sample_weight=torch.tensor([1.0, -1.0])), ValueError, "sample_weight must be finite and non-negative"),
        (dict(token_weight=torch.ones(2, 4)), ValueError, r"token_weight must have shape \(2, 3\)"),
        (dict(token_weight=torch.full((2, 3), float("inf"))), ValueError, "token_weight must be finite"),
        (dict(token_weight=torch.ones(2, 3, dtype=torch.long)), TypeError, "token_weight must have dtype"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
        (dict(z_loss=-1.0), ValueError, "z_loss must be in"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(overwrite_logits=1), TypeError, "overwrite_logits must be a bool"),
        (dict(return_lse=1), TypeError, "return_lse must be a bool"),
        (dict(softcap=-1.0), ValueError, r"softcap must be in \[0.0, inf\]"),
        (dict(softcap=float("nan")), ValueError, "softcap must be in"),
        (dict(softcap=float("inf")), ValueError, "softcap must be finite"),
        (dict(z_loss=float("inf")), ValueError, "z_loss must be finite"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be in"),
        (dict(logits=X.to("meta"), target=T.to("meta")), ValueError,
         "logits is a meta tensor"),
        (dict(softcap="30"), TypeError, "softcap must be a number"),
        (dict(overwrite_logits=True, reduction="sample"), ValueError,
         "overwrite_logits=True needs reduction 'sum' or 'mean'"),
    ],
)
def test_bad_input_weighted(kwargs, exc, match):
    args = dict(logits=X, target=T)
    args.update(kwargs)
    logits, target = args.pop("logits"), args.pop("target")
    with pytest.raises(exc, match=match):
        thresher.weighted_cross_entropy(logits, target, **args)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(lm_weight=torch.randn(10, 5)), ValueError, r"lm_weight must have shape \(\*, 4\)"),
        (dict(lm_weight=torch.randn(10, 4).double()), TypeError, "lm_weight must have dtype float32"),
        (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \(10\)"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(target=torch.full((2, 3), 10)), ValueError, "target values must be in"),
        (dict(z_loss=float("inf")), ValueError, "z_loss must be finite"),
        (dict(hidden=torch.randn(2, 3, 4, device="meta"), lm_weight=torch.randn(10, 4, device="meta"),
              target=T.to("meta")), ValueError, "hidden is a meta tensor"),
    ],
)
def test_bad_input_linear(kwargs, exc, match):
    args = dict(hidden=torch.randn(2, 3, 4), lm_weight=torch.randn(10, 4), target=T)
    args.update(kwargs)
    h, w, t = args.pop("hidden"), args.pop("lm_weight"), args.pop("target")
    with pytest.raises(exc, match=match):
        thresher.linear_weighted_cross_entropy(h, w, t, **args)


def test_modules_wrap_functions():
    x, t, sw, tw = make_case(2, 3, 20, torch.float32)
    m = thresher.WeightedCrossEntropyLoss(reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(
        m(x, t, sample_weight=sw),
        thresher.weighted_cross_entropy(x, t, sample_weight=sw, reduction="sum", label_smoothing=0.1))
    h, w = torch.randn(2, 3, 4), torch.randn(20, 4)
    lm = thresher.LinearWeightedCrossEntropyLoss(reduction="sample")
    torch.testing.assert_close(
        lm(h, w, t, token_weight=tw),
        thresher.linear_weighted_cross_entropy(h, w, t, token_weight=tw, reduction="sample"))
    assert "reduction='sum'" in repr(m)
    with pytest.raises(ValueError, match="reduction must be one of"):
        thresher.WeightedCrossEntropyLoss(reduction="avg")


# ---------------------------------------------------------------------------------------
# Soft-capping (Gemma 2/3): truth is softcap * tanh(x / softcap) then F.cross_entropy, float64
# ---------------------------------------------------------------------------------------


def _softcap_truth(x, t, cap, eps, ii=-100, weight_rows=None):
    x64 = x.detach().double().reshape(-1, x.size(-1)).requires_grad_()
    loss = F.cross_entropy(cap * torch.tanh(x64 / cap), t.reshape(-1), ignore_index=ii,
                           label_smoothing=eps)
    (g,) = torch.autograd.grad(loss, x64)
    return loss.detach(), g.reshape(x.shape)


def _softcap_eager(x, t, cap, eps):
    xe = x.detach().clone().reshape(-1, x.size(-1)).requires_grad_()
    loss = F.cross_entropy(cap * torch.tanh(xe.float() / cap), t.reshape(-1), label_smoothing=eps)
    (g,) = torch.autograd.grad(loss, xe)
    return loss.detach(), g.reshape(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("cap,eps", [(30.0, 0.0), (5.0, 0.1), (1.0, 0.0)])
@pytest.mark.parametrize("V", [7, 1003, 50257])
def test_softcap_matches_tanh_then_cross_entropy(backend, dtype, cap, eps, V):
    # scale 8 logits: cap 30 is nearly linear, cap 5 curved, cap 1 saturated
    x, t, _, _ = make_case(2, 3, V, dtype, scale=8.0, weights=False)
    xs = x.clone().requires_grad_()
    loss = thresher.weighted_cross_entropy(xs, t, softcap=cap, label_smoothing=eps,
                                           backend=backend)
    (g,) = torch.autograd.grad(loss, xs)
    truth, gt = _softcap_truth(x, t, cap, eps)
    eager, ge = _softcap_eager(x, t, cap, eps)
    assert_within_eager("loss", loss, truth, eager, dtype)
    assert_within_eager("grad", g, gt, ge, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_every_reduction_and_weights(backend, reduction):
    x, t, sw, tw = make_case(3, 5, 301, torch.float32, scale=6.0)
    cap = 4.0
    fn = lambda xx, tt, **k: thresher.weighted_cross_entropy(  # noqa: E731
        xx, tt, softcap=cap, backend=backend, **k)
    capped = lambda xx, tt, **k: formula(cap * torch.tanh(xx / cap), tt, **{  # noqa: E731
        "sw": k["sample_weight"], "tw": k["token_weight"], "reduction": k["reduction"],
        "eps": k["label_smoothing"], "zl": k["z_loss"]})
    xs = x.clone().requires_grad_()
    out = fn(xs, t, sample_weight=sw, token_weight=tw, reduction=reduction,
             label_smoothing=0.1, z_loss=1e-3)
    u = torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (g,) = torch.autograd.grad(out, xs, u.float())
    x64 = x.double().requires_grad_()
    truth = capped(x64, t, sample_weight=sw, token_weight=tw, reduction=reduction,
                   label_smoothing=0.1, z_loss=1e-3)
    (g64,) = torch.autograd.grad(truth, x64, u)
    torch.testing.assert_close(out.double(), truth.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_off_values_and_module(backend):
    x, t, _, _ = make_case(2, 3, 50, torch.float32, weights=False)
    plain = thresher.weighted_cross_entropy(x, t, backend=backend)
    for off in (None, 0, 0.0):
        assert torch.equal(thresher.weighted_cross_entropy(x, t, softcap=off, backend=backend),
                           plain)
    m = thresher.WeightedCrossEntropyLoss(softcap=2.0, backend=backend)
    assert "softcap=2.0" in repr(m)
    torch.testing.assert_close(m(x, t), thresher.weighted_cross_entropy(x, t, softcap=2.0,
                                                                         backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_softcap_after_bias(backend, dtype):
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(2, 6, 16, generator=g)).to(dtype)
    w = (torch.randn(300, 16, generator=g)).to(dtype)
    b = (torch.randn(300, generator=g) * 4).to(dtype)
    t = torch.randint(0, 300, (2, 6), generator=g)
    ins = [z.clone().requires_grad_() for z in (h, w, b)]
    loss = thresher.linear_weighted_cross_entropy(ins[0], ins[1], t, bias=ins[2], softcap=3.0,
                                                  chunk_size=5, backend=backend)
    grads = torch.autograd.grad(loss, ins)
    ref = [z.double().requires_grad_() for z in (h, w, b)]
    z = F.linear(ref[0], ref[1], ref[2])
    truth = F.cross_entropy(3.0 * torch.tanh(z / 3.0).reshape(-1, 300), t.reshape(-1))
    tgrads = torch.autograd.grad(truth, ref)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), truth.detach(), **tol)
    for a, r in zip(grads, tgrads):
        torch.testing.assert_close(a.double(), r, **tol)
    lm = thresher.LinearWeightedCrossEntropyLoss(softcap=3.0, chunk_size=5, backend=backend)
    assert "softcap=3.0" in repr(lm)
    torch.testing.assert_close(lm(h, w, t, bias=b), loss.detach())


# ---------------------------------------------------------------------------------------
# Double backward (create_graph=True) and the composable "torch" backend
# ---------------------------------------------------------------------------------------

ALL_BACKENDS = BACKENDS + ["torch"]


def _hvp(loss_fn, inputs, u, vs):
    """(first-order grads, Hessian-vector product along vs) of <loss_fn(*inputs), u>."""
    out = loss_fn(*inputs)
    gs = torch.autograd.grad(out, inputs, u.to(out.dtype), create_graph=True)
    assert all(g.requires_grad for g in gs), "create_graph=True gave a constant gradient"
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs, vs)), inputs)
    return [g.detach() for g in gs], hv


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps,zl,cap", [(0.0, 0.0, None), (0.1, 1e-2, 3.0)])
def test_double_backward_matches_plain_torch(backend, reduction, eps, zl, cap):
    x, t, sw, tw = make_case(2, 4, 37, torch.float64, ignore_frac=0.3)
    ii = 5  # a custom ignore_index: the -100s become 5s
    t = torch.where(t == -100, torch.full_like(t, ii), t)
    x = x.requires_grad_()
    shape = () if reduction in ("sum", "mean") else (t.shape if reduction == "none" else (2,))
    u = torch.rand(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def ours(xx):
        return thresher.weighted_cross_entropy(
            xx, t, sample_weight=sw, token_weight=tw, ignore_index=ii, reduction=reduction,
            label_smoothing=eps, z_loss=zl, softcap=cap, backend=backend)

    def plain(xx):
        xc = cap * torch.tanh(xx / cap) if cap else xx
        return formula(xc, t, sw, tw, ii, reduction, eps, zl)

    (g1,), (h1,) = _hvp(ours, [x], u, [v])
    (g2,), (h2,) = _hvp(plain, [x], u, [v])
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_double_backward_matches_plain_torch(backend, reduction):
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 23, (2, 3), generator=g)
    t[1, 2] = -100
    sw = torch.rand(2, generator=g, dtype=torch.float64)
    shape = () if reduction in ("sum", "mean") else (t.shape if reduction == "none" else (2,))
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    vs = [torch.randn(z.shape, generator=g, dtype=torch.float64) for z in (h, w, b)]
    kw = dict(sample_weight=sw, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)

    def ours(hh, ww, bb):
        return thresher.linear_weighted_cross_entropy(hh, ww, t, bias=bb, chunk_size=4,
                                                      backend=backend, **kw)

    def plain(hh, ww, bb):
        return formula(F.linear(hh, ww, bb), t, sw, None, -100, reduction, 0.1, 1e-2)

    g1, h1 = _hvp(ours, [h, w, b], u, vs)
    g2, h2 = _hvp(plain, [h, w, b], u, vs)
    for a, c in zip(g1 + list(h1), g2 + list(h2)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_reaches_differentiable_weights(backend, reduction):
    x, t, sw, tw = make_case(2, 3, 11, torch.float64)
    sw, tw = sw.clone().requires_grad_(), tw.clone().requires_grad_()
    out = thresher.weighted_cross_entropy(x, t, sample_weight=sw, token_weight=tw,
                                          reduction=reduction, backend=backend)
    ref = formula(x, t, sw, tw, -100, reduction)
    torch.testing.assert_close(out, ref)
    ga = torch.autograd.grad(out.sum(), (sw, tw))
    gb = torch.autograd.grad(ref.sum(), (sw, tw))
    for a, c in zip(ga, gb):
        torch.testing.assert_close(a, c)


def test_torch_backend_is_func_compatible_and_never_auto():
    x, t, _, _ = make_case(2, 3, 13, torch.float64, weights=False)
    v = torch.randn_like(x)

    def f(xx):
        return thresher.weighted_cross_entropy(xx, t, reduction="sample", backend="torch")

    out, jv = torch.func.jvp(f, (x,), (v,))
    ref, jr = torch.func.jvp(lambda xx: formula(xx, t, reduction="sample"), (x,), (v,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(jv, jr)
    assert thresher.ops.cross_entropy.DISPATCH.select("auto", x.device, x.dtype) != "torch"


def test_overwrite_logits_refuses_create_graph():
    x, t, _, _ = make_case(2, 3, 13, torch.float32, weights=False)
    xs = x.clone().requires_grad_()
    loss = thresher.weighted_cross_entropy(xs.clone(), t, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, xs, create_graph=True)


# ---------------------------------------------------------------------------------------
# Numerical edge cases: weight normalisers, masked logits, 16-bit rounding
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", [1e38, 3e-39, 1e-44])
def test_mean_and_sample_normalisers_do_not_overflow_or_underflow(backend, scale):
    x, t, sw, tw = make_case(2, 4, 17, torch.float32, ignore_frac=0.25)
    for reduction, kw in (("mean", dict(sample_weight=sw * scale)),
                          ("mean", dict(token_weight=tw * scale)),
                          ("sample", dict(token_weight=tw * scale))):
        kw = {k: v.float() for k, v in kw.items()}
        got = thresher.weighted_cross_entropy(x, t, reduction=reduction, backend=backend, **kw)
        unit = {k: v.double() / scale for k, v in kw.items()}  # the same weights, rescaled
        want = formula(x.double(), t, unit.get("sample_weight"), unit.get("token_weight"),
                       reduction=reduction)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6,
                                   msg=f"{reduction} {list(kw)}")


def _masked_case(dtype):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 300, generator=g) * 3).to(dtype)
    x[:, ::3] = -math.inf
    x[0, 1:] = -math.inf  # one finite logit: the target's
    t = torch.randint(0, 100, (6,), generator=g) * 3 + 1
    t[0] = 0
    x[0, 0] = 1.0
    return x, t


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_masked_logits_get_exactly_zero_gradient(backend, dtype):
    x, t = _masked_case(dtype)
    for reduction in ("mean", "none"):
        xs = x.clone().requires_grad_()
        out = thresher.weighted_cross_entropy(xs, t, reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(out.sum(), xs)
        masked = torch.isinf(x)
        assert torch.all(g[masked] == 0), (reduction, g[masked].abs().max())
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("upstream", [1.0, 0.3])
def test_16bit_gradient_rounded_once(backend, dtype, upstream):
    # the exact gradient rounded once to the dtype; rounding the fused gradient and then its
    # product with the upstream would disagree on about half the elements
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 500, generator=g) * 3).to(dtype)
    t = torch.randint(0, 500, (64,), generator=g)
    xs = x.clone().requires_grad_()
    loss = thresher.weighted_cross_entropy(xs, t, reduction="sum", backend=backend)
    (gx,) = torch.autograd.grad(loss, xs, torch.tensor(upstream))
    x64 = x.double().requires_grad_()
    (gt,) = torch.autograd.grad(F.cross_entropy(x64, t, reduction="sum") * upstream, x64)
    assert float((gx == gt.to(dtype)).double().mean()) > 0.995


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_bf16_bias_rounded_once(backend):
    # bias added inside the GEMM: loss error at eager torch's level (mm then += bias in bf16
    # rounded the logits twice: 4-65x eager's error)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).bfloat16()
    w = torch.randn(500, 32, generator=g).bfloat16()
    b = (torch.randn(500, generator=g) * 3).bfloat16()
    t = torch.randint(0, 500, (64,), generator=g)
    got = thresher.linear_weighted_cross_entropy(h, w, t, bias=b, chunk_size=16, backend=backend)
    truth = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), t)
    eager = F.cross_entropy(F.linear(h, w, b).float(), t)
    assert abs(float(got) - float(truth)) <= 2 * abs(float(eager) - float(truth)) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-5, 50, 2**40])
def test_bad_target_in_kernel_gives_nan_row_and_no_oob_read(backend, bad):
    # the row kernels are what a compiled graph runs with its value checks skipped
    from thresher.ops._ce_backends import KERNELS
    fwd, bwd = KERNELS[backend]
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, bad, 2])
    coef = torch.ones(3)
    grad = torch.empty_like(x)
    loss, lse = fwd(x, t, coef, grad, -100, 0.0, 0.0, 0.0)
    ok = torch.tensor([True, False, True])
    assert torch.isnan(loss[1]) and torch.isfinite(loss[ok]).all()
    want, _, wgrad = thresher.ops.cross_entropy.reference_cross_entropy_rows(
        x.double(), torch.tensor([1, 0, 2]), coef.double(), -100, 0.0, 0.0)
    torch.testing.assert_close(loss[ok].double(), want[ok], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[ok].double(), wgrad[ok], rtol=1e-5, atol=1e-7)
    # the bad row's gradient is the softmax without a target term (finite)
    torch.testing.assert_close(grad[1].double(), torch.softmax(x[1].double(), 0), rtol=1e-5,
                               atol=1e-7)
    grad2 = torch.empty_like(x)
    bwd(x, t, lse, coef, grad2, -100, 0.0, 0.0, 0.0)
    torch.testing.assert_close(grad2, grad)


def test_bad_target_under_compile_is_nan_not_a_crash():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 50)
    t = torch.tensor([[1, 2, 2**40], [0, -7, 3]])

    def f(x, t):
        return thresher.weighted_cross_entropy(x, t, reduction="none")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t)
    assert torch.isnan(out[0, 2]) and torch.isnan(out[1, 1])
    assert torch.isfinite(out[0, :2]).all()
    with pytest.raises(ValueError, match="target values must be in"):
        f(x, t)  # eagerly: the clear error


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_zero_hidden_size(backend):
    # H = 0: the logits are the bias (or 0), the gradients of hidden and lm_weight are empty
    t = torch.randint(0, 10, (2, 3))
    b = torch.randn(10, requires_grad=True)
    h = torch.randn(2, 3, 0, requires_grad=True)
    w = torch.randn(10, 0, requires_grad=True)
    loss = thresher.linear_weighted_cross_entropy(h, w, t, bias=b, backend=backend)
    bb = b.detach().clone().requires_grad_()
    ref = F.cross_entropy(bb.expand(6, 10), t.reshape(-1))
    torch.testing.assert_close(loss, ref)
    gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
    assert gh.shape == h.shape and gw.shape == w.shape
    torch.testing.assert_close(gb, torch.autograd.grad(ref, bb)[0])
    no_bias = thresher.linear_weighted_cross_entropy(h.detach(), w.detach(), t, backend=backend)
    torch.testing.assert_close(no_bias, torch.tensor(math.log(10.0)))


@pytest.mark.parametrize("env,nvcc,torch_cuda,want", [
    ({"THRESHER_CUDA": "0"}, True, "12.8", "THRESHER_CUDA=0 turns it off"),
    ({}, False, "12.8", "no nvcc was found"),
    ({}, True, None, "torch is a CPU build .* THRESHER_CUDA is not set to 1"),
    ({"THRESHER_CUDA": "1"}, True, None, "nvcc and the settings to build it are present now"),
])
def test_native_status_says_why_cuda_module_was_not_built(monkeypatch, env, nvcc, torch_cuda,
                                                          want):
    import importlib

    def no_cuda_module(name, *a, **k):
        if name == "thresher._C_cuda":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return importlib.import_module(name, *a, **k)

    monkeypatch.delenv("THRESHER_CUDA", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(_native.importlib, "import_module", no_cuda_module)
    monkeypatch.setattr(_native, "_nvcc_found", lambda: nvcc)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.delitem(_native._modules, "_C_cuda", raising=False)
    monkeypatch.delitem(_native._reasons, "_C_cuda", raising=False)
    status = thresher.native_status()["_C_cuda"]
    assert "could not be imported" not in status
    assert re.search("thresher._C_cuda was not built: " + want, status), status



# ---------------------------------------------------------------------------------------
# return_lse: per-token log-sum-exp and the z-loss term alongside the loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("linear", [False, True])
def test_return_lse_and_z_loss_term(backend, reduction, linear):
    x, t, sw, tw = make_case(2, 5, 41, torch.float32, ignore_frac=0.3)
    kw = dict(sample_weight=sw, token_weight=tw, reduction=reduction, label_smoothing=0.1,
              z_loss=1e-2, softcap=6.0, backend=backend)
    if linear:
        h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
        wt = torch.randn(41, 8, generator=torch.Generator().manual_seed(3))
        x = F.linear(h, wt)
        run = lambda **k: thresher.linear_weighted_cross_entropy(  # noqa: E731
            h.clone().requires_grad_(), wt, t, chunk_size=3, **k)
    else:
        run = lambda **k: thresher.weighted_cross_entropy(  # noqa: E731
            x.clone().requires_grad_(), t, **k)
    out = run(return_lse=True, **kw)
    assert isinstance(out, thresher.ops.CrossEntropyOutput)
    loss, lse, zterm = out
    torch.testing.assert_close(loss, run(**kw))
    xc = 6.0 * torch.tanh(x.double() / 6.0)
    want = torch.where(t != -100, torch.logsumexp(xc, -1), torch.zeros(()).double())
    assert lse.shape == t.shape and not lse.requires_grad and not zterm.requires_grad
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)
    zt = formula(xc, t, sw, tw, -100, reduction, 0.0, 1e-2) - formula(xc, t, sw, tw, -100,
                                                                        reduction, 0.0, 0.0)
    torch.testing.assert_close(zterm.double(), zt, rtol=1e-4, atol=1e-6)
    loss.sum().backward()  # the loss still has its gradient


# ---------------------------------------------------------------------------------------
# Class weights (weight=, as F.cross_entropy's)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_weight_matches_f_cross_entropy(backend, reduction, dtype):
    x, t, _, _ = make_case(3, 4, 29, dtype, ignore_frac=0.25, weights=False)
    cw = torch.rand(29, generator=torch.Generator().manual_seed(6), dtype=dtype) * 2
    cw[t.reshape(-1)[0].clamp_min(0)] = 0.0  # a zero class weight too
    xs = x.clone().requires_grad_()
    got = thresher.weighted_cross_entropy(xs, t, weight=cw, reduction=reduction,
                                          backend=backend)
    x64 = x.double().requires_grad_()
    want = F.cross_entropy(x64.reshape(-1, 29), t.reshape(-1), weight=cw.double(),
                           reduction=reduction)
    want = want.reshape(t.shape) if reduction == "none" else want
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    u = torch.rand(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (g,) = torch.autograd.grad(got, xs, u.to(got.dtype))
    (gw,) = torch.autograd.grad(want, x64, u)
    torch.testing.assert_close(g.double(), gw, **tol)


def _class_weight_truth(x64, t, cw, sw, tw, reduction, eps):
    """F.cross_entropy(weight=, label_smoothing=) per token in float64, with the sample and
    token weights on top; "mean"/"sample" divide by the same weights times weight[target]."""
    V, d = x64.size(-1), x64.dtype
    cw, sw, tw = cw.to(d), sw.to(d), tw.to(d)
    tok = F.cross_entropy(x64.reshape(-1, V), t.reshape(-1), weight=cw,
                          label_smoothing=eps, reduction="none").reshape(t.shape)
    ww = tw * sw[:, None]
    nw = ww * cw[t.clamp_min(0)] * (t != -100)
    if reduction == "none":
        return tok * ww
    if reduction == "sum":
        return (tok * ww).sum()
    if reduction == "mean":
        return (tok * ww).sum() / nw.sum()
    ntw = tw * cw[t.clamp_min(0)] * (t != -100)
    return sw * (tok * tw).sum(1) / ntw.sum(1)


def _class_weights(V, dtype, t, seed=6):
    cw = (torch.rand(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
          * 2).to(dtype)
    cw[t.reshape(-1)[0].clamp_min(0)] = 0.0  # a zero class weight: its tokens still count
    return cw


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_class_weight_with_smoothing_matches_f_cross_entropy(backend, reduction, dtype):
    x, t, sw, tw = make_case(3, 4, 29, dtype, ignore_frac=0.25)
    cw = _class_weights(29, dtype, t)
    eps = 0.2
    u = torch.rand(t.shape if reduction == "none" else (3,) if reduction == "sample" else (),
                   generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    xs = x.clone().requires_grad_()
    got = thresher.weighted_cross_entropy(xs, t, weight=cw, sample_weight=sw, token_weight=tw,
                                          label_smoothing=eps, reduction=reduction,
                                          backend=backend)
    (g,) = torch.autograd.grad(got, xs, u.to(got.dtype))
    x64 = x.double().requires_grad_()
    want = _class_weight_truth(x64, t, cw, sw, tw, reduction, eps)
    (gw,) = torch.autograd.grad(want, x64, u)
    if dtype == torch.bfloat16:  # within 2x the error of F.cross_entropy run in bf16
        xe = x.clone().requires_grad_()
        eager = _class_weight_truth(xe, t, cw, sw, tw, reduction, eps)
        (ge,) = torch.autograd.grad(eager, xe, u.to(eager.dtype))
        assert_within_eager("loss", got, want.detach(), eager.detach(), dtype)
        assert_within_eager("grad", g, gw, ge, dtype)
        return
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(g.double(), gw, **tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_weight_with_smoothing_linear(backend, reduction):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(23, 8, generator=g, dtype=torch.float64)
    b = torch.randn(23, generator=g, dtype=torch.float64)
    t = torch.randint(0, 23, (2, 5), generator=g)
    t[0, 1] = t[1, 4] = -100
    cw, sw, tw = _class_weights(23, torch.float64, t), torch.rand(2, generator=g, dtype=torch.float64), \
        torch.rand(2, 5, generator=g, dtype=torch.float64)
    u = torch.rand(t.shape if reduction == "none" else (2,) if reduction == "sample" else (),
                   generator=g, dtype=torch.float64)
    for dtype, tol in [(torch.float64, dict(rtol=1e-10, atol=1e-12)),
                       (torch.float32, dict(rtol=1e-5, atol=1e-5))]:
        ins = [v.to(dtype).requires_grad_() for v in (h, w, b)]
        got = thresher.linear_weighted_cross_entropy(
            ins[0], ins[1], t, bias=ins[2], weight=cw.to(dtype), sample_weight=sw.to(dtype),
            token_weight=tw.to(dtype), label_smoothing=0.3, reduction=reduction, chunk_size=3,
            backend=backend)
        grads = torch.autograd.grad(got, ins, u.to(got.dtype))
        ref = [v.clone().requires_grad_() for v in (h, w, b)]
        want = _class_weight_truth(F.linear(*ref), t, cw, sw, tw, reduction, 0.3)
        wgrads = torch.autograd.grad(want, ref, u)
        torch.testing.assert_close(got.double(), want.detach(), **tol)
        for a, e in zip(grads, wgrads):
            torch.testing.assert_close(a.double(), e, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weight_with_smoothing_overwrite_zloss_and_lse(backend):
    """overwrite_logits keeps the smoothing term (read before the kernel overwrites the
    logits); the z-loss is scaled by a_t = (1 - eps) w_y + eps W / V, the class weight
    expected under the smoothed target (w_y without smoothing)."""
    x, t, _, _ = make_case(2, 6, 31, torch.float64, ignore_frac=0.3, weights=False)
    cw = _class_weights(31, torch.float64, t)
    eps, zl = 0.25, 1e-2
    kw = dict(weight=cw, label_smoothing=eps, reduction="mean", backend=backend)
    xs = x.clone().requires_grad_()
    ref = thresher.weighted_cross_entropy(xs, t, **kw)
    (g_ref,) = torch.autograd.grad(ref, xs)
    xo = x.clone().requires_grad_()
    got = thresher.weighted_cross_entropy(xo.clone(), t, overwrite_logits=True, **kw)
    (g_got,) = torch.autograd.grad(got, xo)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-12)

    x64 = x.clone().requires_grad_()
    out = thresher.weighted_cross_entropy(x64, t, z_loss=zl, return_lse=True, **kw)
    ones = torch.ones_like(t, dtype=torch.float64)
    lse = torch.where(t != -100, torch.logsumexp(x, -1), torch.zeros(()).double())
    a = (1 - eps) * cw[t.clamp_min(0)] + eps * cw.sum() / 31
    norm = (cw[t.clamp_min(0)] * (t != -100)).sum()
    zterm = (zl * a * lse * lse).sum() / norm
    torch.testing.assert_close(out.z_loss, zterm, rtol=1e-10, atol=1e-12)
    want = _class_weight_truth(x64, t, cw, ones[:, 0], ones, "mean", eps)
    torch.testing.assert_close(out.loss, want + zterm, rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="label_smoothing > 0 and softcap"):
        thresher.weighted_cross_entropy(x, t, softcap=5.0, **kw)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_class_weight_linear_sample_and_errors(backend):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(19, 8, generator=g)
    t = torch.randint(0, 19, (2, 5), generator=g)
    t[0, 1] = -100
    cw = torch.rand(19, generator=g) + 0.1
    tw = torch.rand(2, 5, generator=g)
    got = thresher.linear_weighted_cross_entropy(h, w, t, weight=cw, token_weight=tw,
                                                 reduction="sample", backend=backend)
    tok = F.cross_entropy(F.linear(h, w).reshape(-1, 19), t.reshape(-1), reduction="none",
                          ignore_index=-100).reshape(2, 5)
    ww = tw * cw[t.clamp_min(0)] * (t != -100)
    torch.testing.assert_close(got, (tok * ww).sum(1) / ww.sum(1))
    with pytest.raises(NotImplementedError, match="label_smoothing > 0 and softcap"):
        thresher.linear_weighted_cross_entropy(h, w, t, weight=cw, label_smoothing=0.1,
                                               softcap=5.0, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(19\)"):
        thresher.linear_weighted_cross_entropy(h, w, t, weight=cw[:5], backend=backend)
    with pytest.raises(ValueError, match="weight must be finite and non-negative"):
        thresher.linear_weighted_cross_entropy(h, w, t, weight=-cw, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("scalar", [0.1, 10.0])
def test_softcap_with_ignore_index_and_smoothing_like_peers(backend, reduction, scalar):
    # the case mix of Liger-Kernel's softcap tests: a custom ignore_index, label smoothing,
    # every F.cross_entropy reduction, small and large logit scales (large saturates the tanh)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3 * 7, 257, generator=g) * scalar
    t = torch.randint(0, 257, (3 * 7,), generator=g)
    t[::4] = 2
    xs = x.clone().requires_grad_()
    got = thresher.weighted_cross_entropy(xs, t, ignore_index=2, label_smoothing=0.1,
                                          softcap=5.0, reduction=reduction, backend=backend)
    x64 = x.double().requires_grad_()
    want = F.cross_entropy(5.0 * torch.tanh(x64 / 5.0), t, ignore_index=2, label_smoothing=0.1,
                           reduction=reduction)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    u = torch.rand(want.shape, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad(got, xs, u.float())
    (gb,) = torch.autograd.grad(want, x64, u)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-7)


def test_one_ignore_index_constant_is_every_default():
    # ops, models, selectors and the packer all use thresher.ops.IGNORE_INDEX (-100, as
    # F.cross_entropy and HF), so a sample padded by `pack` is ignored by every loss
    import inspect

    from thresher.ops import IGNORE_INDEX, WeightedCrossEntropyLoss

    assert IGNORE_INDEX == -100
    for fn in (thresher.weighted_cross_entropy, thresher.linear_weighted_cross_entropy,
               WeightedCrossEntropyLoss.__init__):
        assert inspect.signature(fn).parameters["ignore_index"].default == IGNORE_INDEX
