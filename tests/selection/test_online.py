"""Tests for thresher.selection.online: the top-k oracle, the online baselines (random,
high-loss, RHO-LOSS, RHO-1), the validation stream, the factory and bad arguments.

The models are a tiny private causal LM (below) with GPT's ``loss`` API, in float64, so the
tests do not depend on the GPT's speed; one test runs the real ``thresher.models.GPT``.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thresher.ops import linear_weighted_cross_entropy
from thresher.selection.online import (
    HighLossSelector,
    RandomSelector,
    Rho1Selector,
    RhoLossSelector,
    ValStream,
    budget,
    build_online_selector,
    topk_weights,
)


class TinyLM(nn.Module):
    """h_t = tanh(E[x_t] + E[x_{t-1}] M); causal; loss through the fused weighted-CE op
    with GPT.loss's conventions (targets labels[:, 1:], token_weight (B, T) or (B, T-1))."""

    def __init__(self, vocab=13, d=8, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, d, generator=g, dtype=dtype) * 0.7)
        self.mix = nn.Parameter(torch.randn(d, d, generator=g, dtype=dtype) * 0.4)
        self.head = nn.Parameter(torch.randn(vocab, d, generator=g, dtype=dtype) * 0.7)

    def forward(self, ids):
        e = self.emb[ids]
        prev = F.pad(e, (0, 0, 1, 0))[:, :-1]
        return torch.tanh(e + prev @ self.mix)

    def loss(self, input_ids, labels=None, *, reduction="mean", sample_weight=None,
             token_weight=None):
        labels = input_ids if labels is None else labels
        if token_weight is not None and token_weight.shape == labels.shape:
            token_weight = token_weight[:, 1:]
        h = self(input_ids)[:, :-1]
        return linear_weighted_cross_entropy(
            h, self.head, labels[:, 1:].contiguous(), sample_weight=sample_weight,
            token_weight=None if token_weight is None else token_weight.contiguous(),
            reduction=reduction)


def batch(B=8, T=7, vocab=13, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    if pad:
        # ragged tails of padding (ignored labels), one sample fully padded
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        lengths[B // 2] = 0
        labels[torch.arange(T)[None, :] >= lengths[:, None]] = -100
    return ids, labels


def true_losses(model, ids, labels, granularity):
    with torch.no_grad():
        return model.loss(ids, labels, reduction="sample" if granularity == "sequence" else "none")


def expected_alpha(scores, labels, gamma, granularity):
    """Brute force: rank (score desc, position asc) in Python, keep round-half-up(gamma n)."""
    valid = labels[:, 1:] != -100
    if granularity == "sequence":
        valid = valid.any(1)
    flat_s = scores.reshape(-1).tolist()
    flat_v = valid.reshape(-1).tolist()
    n = len(flat_s) if granularity == "sequence" else sum(flat_v)
    k = min(n, max(1, math.floor(gamma * n + 0.5 + 1e-9))) if n else 0
    key = [(-(s if v else -math.inf), i) for i, (s, v) in enumerate(zip(flat_s, flat_v))]
    keep = [i for _, i in sorted(key)[:k]]
    a = torch.zeros(len(flat_s), dtype=torch.float32)
    a[keep] = 1
    a = a.reshape(scores.shape)
    if granularity == "token":
        a = torch.cat([torch.zeros(a.size(0), 1), a], 1)
    return a, k


# ---------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,count,k", [(0.5, 5, 3), (0.3, 5, 2), (0.6, 10, 6), (0.1, 3, 1),
                                           (1.0, 7, 7), (0.6, 0, 0), (0.25, 2, 1)])
def test_budget_rounds_half_up(gamma, count, k):
    assert budget(gamma, count) == k


def test_topk_weights_ties_are_broken_by_position():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, -math.inf, 2.0])
    assert topk_weights(scores, 2).tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert topk_weights(scores, 4).tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert topk_weights(scores, 6).tolist() == [1, 1, 1, 1, 1, 0, 1]
    assert topk_weights(scores, 7).tolist() == [1] * 7  # -inf only when k demands it
    # 2-D: row-major order breaks ties
    s2 = torch.zeros(3, 4)
    assert topk_weights(s2, 5).reshape(-1).tolist() == [1] * 5 + [0] * 7
    with pytest.raises(ValueError, match="NaN"):
        topk_weights(torch.tensor([0.0, float("nan")]), 1)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("gamma", [0.6, 0.3, 1.0])
def test_highloss_is_exactly_top_gamma(granularity, gamma):
    model = TinyLM()
    ids, labels = batch(B=9, T=6)
    sel = HighLossSelector(model, gamma=gamma, granularity=granularity)
    alpha = sel.select(ids, labels)
    want, k = expected_alpha(true_losses(model, ids, labels, granularity), labels, gamma,
                             granularity)
    assert alpha.dtype == torch.float32 and alpha.shape == want.shape
    assert torch.equal(alpha, want) and int(alpha.sum()) == k


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_random_selector_budget_and_padding(granularity):
    model = TinyLM()
    ids, labels = batch(B=10, T=6)
    sel = RandomSelector(model, gamma=0.5, granularity=granularity, seed=3)
    seen = torch.zeros(labels.shape if granularity == "token" else labels.shape[:1])
    for _ in range(20):
        a = sel.select(ids, labels)
        seen += a
        n = labels.size(0) if granularity == "sequence" else int((labels[:, 1:] != -100).sum())
        assert int(a.sum()) == budget(0.5, n)
        if granularity == "token":
            assert not bool(a[:, 0].any()) and not bool(a[labels == -100].any())
        else:
            assert a[labels.size(0) // 2] == 0  # the fully padded sample is picked last
    # every valid entry is picked sometimes: it is random, not fixed
    valid = labels != -100 if granularity == "token" else (labels[:, 1:] != -100).any(1)
    if granularity == "token":
        valid[:, 0] = False
    assert bool((seen[valid] > 0).all())


# ---------------------------------------------------------------------------------------
# Static-reference baselines
# ---------------------------------------------------------------------------------------


def two_domain_data(n, T=12, vocab=13, seed=0):
    """Target domain: counting sequences x_{t+1} = x_t + 1 (mod V), learnable by TinyLM;
    noise domain: uniform random tokens (irreducible loss log V)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    target = (start + torch.arange(T)[None]) % vocab
    noise = torch.randint(0, vocab, (n, T), generator=g)
    return target, noise


@pytest.mark.parametrize("name,granularity", [("rho", "sequence"), ("rho1", "token")])
def test_rho_is_top_excess_against_the_static_reference(name, granularity):
    torch.manual_seed(0)
    model = TinyLM()
    val, _ = two_domain_data(32)
    sel = build_online_selector(name, model, val, gamma=0.5, ref_steps=30, ref_lr=0.05,
                                val_batch_size=8)
    assert sel.granularity == granularity
    ids, labels = batch(B=8, T=8)
    a = sel.select(ids, labels)
    assert sel.trained and sel.fwdbwd_tokens == 30 * 8 * 12
    ref_state = {k: v.clone() for k, v in sel.reference.state_dict().items()}
    excess = (true_losses(model, ids, labels, granularity)
              - true_losses(sel.reference, ids, labels, granularity))
    want, _ = expected_alpha(excess, labels, 0.5, granularity)
    assert torch.equal(a, want)
    # static: more calls never touch the reference again
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    sel.select(ids, labels)
    assert all(torch.equal(v, sel.reference.state_dict()[k]) for k, v in ref_state.items())
    # the reference learned the target domain: its val loss is far below the model's
    with torch.no_grad():
        assert float(sel.reference.loss(val)) < 0.5 * float(model.loss(val))


def test_rho_prefers_target_domain_sequences():
    torch.manual_seed(0)
    model = TinyLM()
    val, _ = two_domain_data(32, seed=1)
    tgt, noise = two_domain_data(8, seed=2)
    ids = torch.cat([noise[:4], tgt[:4], noise[4:], tgt[4:]])  # interleaved domains
    sel = RhoLossSelector(model, val, gamma=0.5, ref_steps=40, ref_lr=0.05, val_batch_size=8)
    a = sel.select(ids)
    is_target = torch.tensor([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4, dtype=torch.float32)
    assert torch.equal(a, is_target)


def test_given_reference_is_used_as_is():
    model, ref = TinyLM(seed=0), TinyLM(seed=5)
    sel = RhoLossSelector(model, None, reference=ref, gamma=0.5)
    ids, labels = batch()
    a = sel.select(ids, labels)
    excess = true_losses(model, ids, labels, "sequence") - true_losses(ref, ids, labels, "sequence")
    assert torch.equal(a, expected_alpha(excess, labels, 0.5, "sequence")[0])
    assert sel.fwdbwd_tokens == 0


# ---------------------------------------------------------------------------------------
# Gradient of the alpha-weighted loss == gradient over the selected samples/tokens only
# ---------------------------------------------------------------------------------------


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["highloss", "random"])
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_weighted_gradient_equals_selected_only(name, granularity):
    model = TinyLM()
    ids, labels = batch(B=10, T=9, seed=4)
    a = build_online_selector(name, model, None, gamma=0.4, granularity=granularity).select(
        ids, labels)
    if granularity == "sequence":
        got = _grads(model, model.loss(ids, labels, sample_weight=a.double()))
        keep = a > 0
        want = _grads(model, model.loss(ids[keep], labels[keep]))
    else:
        got = _grads(model, model.loss(ids, labels, token_weight=a.double()))
        only = labels.masked_fill(a == 0, -100)  # unselected tokens ignored outright
        want = _grads(model, model.loss(ids, only))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# Validation stream, checkpoints, factory, bad arguments
# ---------------------------------------------------------------------------------------


def test_val_stream_cycles_and_resumes():
    ids = torch.arange(10 * 3).reshape(10, 3)
    s = ValStream(ids, batch_size=4, seed=7)
    first = [s.next()[0] for _ in range(5)]  # crosses an epoch (2 batches of 4 per epoch)
    for b in first[:2]:
        assert b.shape == (4, 3)
    assert len({int(r[0]) for b in first[:2] for r in b}) == 8  # no repeats within an epoch
    s2 = ValStream(ids, batch_size=4, seed=7)
    [s2.next() for _ in range(3)]
    st = s2.state_dict()
    s3 = ValStream(ids, batch_size=4, seed=7)
    s3.load_state_dict(st)
    assert torch.equal(s3.next()[0], first[3]) and torch.equal(s3.next()[0], first[4])


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name,opts", [
    ("random", {"granularity": "token"}), ("highloss", {}),
    ("rho", {"ref_steps": 3, "val_batch_size": 4}),
    ("rho1", {"ref_steps": 3, "val_batch_size": 4})])
def test_state_dict_round_trip_continues_identically(name, opts):
    val, _ = two_domain_data(12)
    batches = [batch(B=6, T=7, seed=s) for s in range(8)]

    def run(model, sel, opt, bs):
        out = []
        for ids, labels in bs:
            a = sel.select(ids, labels)
            kw = {"sample_weight": a.double()} if a.dim() == 1 else {"token_weight": a.double()}
            model.loss(ids, labels, **kw).backward()
            opt.step()
            opt.zero_grad()
            out.append(a)
        return out

    def fresh():
        m = TinyLM()
        return m, build_online_selector(name, m, val, gamma=0.5, **opts), \
            torch.optim.AdamW(m.parameters(), lr=0.05)

    m, sel, opt = fresh()
    run(m, sel, opt, batches[:4])
    ckpt = _roundtrip({"model": m.state_dict(), "opt": opt.state_dict(), "sel": sel.state_dict()})
    tail_a = run(m, sel, opt, batches[4:])
    m2, sel2, opt2 = fresh()
    m2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sel2.load_state_dict(ckpt["sel"])
    tail_b = run(m2, sel2, opt2, batches[4:])
    for x, y in zip(tail_a, tail_b):
        assert torch.equal(x, y)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert sel.state_dict()["calls"] == sel2.state_dict()["calls"] == 8
    with pytest.raises(ValueError, match="selector"):
        HighLossSelector(TinyLM()).load_state_dict(RandomSelector(TinyLM()).state_dict())


def test_factory_names_and_classes():
    m = TinyLM()
    val, _ = two_domain_data(4)
    assert isinstance(build_online_selector("random", m, None), RandomSelector)
    assert isinstance(build_online_selector("highloss", m, None), HighLossSelector)
    assert type(build_online_selector("rho", m, val)) is RhoLossSelector
    assert isinstance(build_online_selector("rho1", m, val), Rho1Selector)
    with pytest.raises(ValueError, match="name"):
        build_online_selector("bliss", m, val)
    with pytest.raises(TypeError):
        build_online_selector("random", m, None, tau=3)  # an option it does not take


@pytest.mark.parametrize("gamma", [0, 0.0, -0.1, 1.5, float("nan")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        HighLossSelector(TinyLM(), gamma=gamma)


def test_bad_arguments():
    m = TinyLM()
    with pytest.raises(TypeError, match="gamma"):
        HighLossSelector(m, gamma="0.5")
    with pytest.raises(ValueError, match="granularity"):
        HighLossSelector(m, granularity="document")
    with pytest.raises(TypeError, match="model"):
        HighLossSelector(nn.Linear(2, 2))
    for bad in (None, torch.zeros(0, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match="val_data"):
            build_online_selector("rho", m, bad)
    with pytest.raises(ValueError, match="val_data"):
        build_online_selector("rho", m, torch.full((3, 5), -100))
    with pytest.raises(TypeError, match="val_data"):
        build_online_selector("rho", m, [1, 2, 3])
    val = torch.randint(0, 8, (4, 6))
    with pytest.raises(ValueError, match=r"ref_betas must be a pair"):
        build_online_selector("rho", m, val, ref_betas=0.9)
    with pytest.raises(ValueError, match=r"ref_lr must be in \(0.0, inf\], got 0.0"):
        build_online_selector("rho", m, val, ref_lr=0.0)
    sel = HighLossSelector(m)
    with pytest.raises(ValueError, match="input_ids"):
        sel.select(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        sel.select(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels"):
        sel.select(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_with_the_real_gpt():
    models = pytest.importorskip("thresher.models.gpt", reason="thresher.models.GPT not landed")
    torch.manual_seed(0)
    cfg = models.GPTConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    gpt = models.GPT(cfg)
    val, _ = two_domain_data(8)
    ids, labels = batch(B=6, T=8)
    for name in ("rho1", "highloss"):
        sel = build_online_selector(name, gpt, val, gamma=0.5, **(
            {"ref_steps": 2, "val_batch_size": 4} if name == "rho1" else {}))
        a = sel.select(ids, labels)
        kw = {"token_weight": a} if a.dim() == 2 else {"sample_weight": a}
        loss = gpt.loss(ids, labels, **kw)
        loss.backward()
        assert torch.isfinite(loss)
        assert int(a.sum()) == budget(0.5, sel.count(labels))
