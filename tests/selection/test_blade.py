"""Tests for thresher.selection.blade.BLADE: the oracle is exactly top-gamma by the excess
loss against the dynamic reference, the reference re-syncs from theta exactly every tau
calls and takes exactly the specified AdamW steps, the alpha-weighted gradient equals the
gradient over the selected samples/tokens (float64), padding / ignore_index at both
granularities, checkpoint round trips and bad arguments.

The tiny float64 LM and the batch helpers live in test_online.py (loaded by path, since the
tests are imported in importlib mode, without packages).
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

from thresher.selection import blade as blade_mod
from thresher.selection.blade import BLADE
from thresher.selection.online import ValStream, budget, build_online_selector

_spec = importlib.util.spec_from_file_location(
    "_thresher_online_test_helpers", pathlib.Path(__file__).with_name("test_online.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)
TinyLM, batch, expected_alpha, true_losses, two_domain_data = (
    H.TinyLM, H.batch, H.expected_alpha, H.true_losses, H.two_domain_data)


def train_step(model, opt, ids, labels, a):
    kw = {"sample_weight": a.double()} if a.dim() == 1 else {"token_weight": a.double()}
    model.loss(ids, labels, **kw).backward()
    opt.step()
    opt.zero_grad()


# ---------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("gamma", [0.6, 0.25])
def test_alpha_is_exactly_top_gamma_excess(granularity, gamma):
    model = TinyLM()
    val, _ = two_domain_data(16)
    b = BLADE(model, val, gamma=gamma, tau=2, ref_steps=3, ref_lr=0.05, val_batch_size=4,
              granularity=granularity)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(4):  # sync, no sync, sync, no sync
        ids, labels = batch(B=9, T=7, seed=seed)
        a = b.select(ids, labels)
        excess = (true_losses(model, ids, labels, granularity)
                  - true_losses(b.reference, ids, labels, granularity))
        want, k = expected_alpha(excess, labels, gamma, granularity)
        assert a.shape == want.shape and torch.equal(a, want)
        assert int(a.sum()) == k == budget(gamma, b.count(labels))
        if granularity == "token":
            assert not bool(a[:, 0].any()) and not bool(a[labels == -100].any())
        train_step(model, opt, ids, labels, a)


def test_exact_ties_are_broken_by_position():
    # A model with zero embeddings and head predicts uniformly: every loss is exactly log V.
    # With a vanishing ref_lr the fitted reference still predicts uniformly, so every excess
    # is exactly 0 and the oracle must keep the first k samples.
    model = TinyLM()
    with torch.no_grad():
        model.head.zero_()
        model.emb.zero_()
    val = torch.zeros(2, 5, dtype=torch.long)
    b = BLADE(model, val, gamma=0.5, tau=100, ref_steps=1, ref_lr=1e-300, val_batch_size=2,
              ref_warmup_steps=0)
    ids, labels = batch(B=8, T=6, pad=False)
    a = b.select(ids, labels)
    assert torch.equal(b.last_scores, torch.zeros(8))
    assert a.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


# ---------------------------------------------------------------------------------------
# The dynamic reference
# ---------------------------------------------------------------------------------------


def test_reference_resyncs_exactly_every_tau_calls(monkeypatch):
    model = TinyLM()
    val, _ = two_domain_data(16)
    b = BLADE(model, val, gamma=0.5, tau=3, ref_steps=2, ref_lr=0.05, val_batch_size=4,
              ref_schedule="reset")
    events = []
    real_fit = blade_mod.fit_reference

    def spy(reference, optimizer, steps, val_stream, **kw):
        same = all(torch.equal(p, q) for p, q in zip(reference.parameters(), model.parameters()))
        events.append((b.calls, same, steps, kw["train_batch"][2].clone()))
        return real_fit(reference, optimizer, steps, val_stream, **kw)

    monkeypatch.setattr(blade_mod, "fit_reference", spy)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    snapshots = []
    for call in range(11):
        ids, labels = batch(B=8, T=7, seed=call)
        ref_before = [p.clone() for p in b.reference.parameters()]
        stale = (true_losses(model, ids, labels, "sequence")
                 - true_losses(b.reference, ids, labels, "sequence"))
        a = b.select(ids, labels)
        changed = any(not torch.equal(p, q) for p, q in zip(ref_before, b.reference.parameters()))
        assert changed == (call % 3 == 0), call
        if call % 3 == 0 and call > 0:
            # the reference fitted the alpha the oracle gave this batch under the old reference
            assert torch.equal(events[-1][3], expected_alpha(stale, labels, 0.5, "sequence")[0])
        snapshots.append(b.syncs)
        train_step(model, opt, ids, labels, a)
    assert [e[0] for e in events] == [0, 3, 6, 9]
    assert all(e[1] for e in events)  # w == theta at the start of every fit: a re-sync
    assert all(e[2] == 2 for e in events)
    assert torch.equal(events[0][3], torch.ones(8))  # first sync: the plain batch loss
    assert snapshots == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
    assert b.last_sync_call == 9
    # the reference is a separate copy: training theta leaves it alone
    assert all(p.data_ptr() != q.data_ptr()
               for p, q in zip(b.reference.parameters(), model.parameters()))


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_reference_takes_exactly_K_adamw_steps_on_val_plus_lambda_train(granularity):
    model = TinyLM()
    val, _ = two_domain_data(16)
    K, lam = 4, 0.7
    b = BLADE(model, val, gamma=0.5, tau=5, ref_steps=K, lam=lam, ref_lr=0.03,
              ref_weight_decay=0.01, ref_grad_clip=0.5, val_batch_size=4, seed=11,
              granularity=granularity, ref_schedule="reset")
    ids, labels = batch(B=6, T=7)
    b.select(ids, labels)
    # replicate by hand: w = theta, K AdamW steps on L_val(w) + lam * L_train(1, w)
    w = TinyLM()
    w.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(w.parameters(), lr=0.03, betas=(0.9, 0.95), weight_decay=0.01)
    stream = ValStream(val, batch_size=4, seed=11)
    ones = (torch.ones(6, dtype=torch.float64) if granularity == "sequence"
            else (labels != -100).double())
    kw = {"sample_weight": ones} if granularity == "sequence" else {"token_weight": ones}
    for _ in range(K):
        vi, vl = stream.next()
        loss = w.loss(vi, vl) + lam * w.loss(ids, labels, **kw)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(w.parameters(), 0.5)
        opt.step()
    for p, q in zip(w.parameters(), b.reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # rows with no positive weight (the fully padded sample, at token level) are skipped
    rows = 6 if granularity == "sequence" else int((labels != -100).any(1).sum())
    assert b.fwdbwd_tokens == K * (4 * 12 + rows * 7)
    assert b.fwd_tokens == 2 * 6 * 7  # theta and w on the candidate batch


def _fit_by_hand(w, opt, stream, steps, lam=0.0, train=None, clip=1.0):
    for _ in range(steps):
        vi, vl = stream.next()
        loss = w.loss(vi, vl)
        if train is not None:
            ids, labels, a = train
            kw = {"sample_weight": a.double()} if a.dim() == 1 else {"token_weight": a.double()}
            keep = a > 0 if a.dim() == 1 else (a > 0).any(1)
            loss = loss + lam * w.loss(ids[keep], labels[keep],
                                       **{k: v[keep] for k, v in kw.items()})
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(w.parameters(), clip)
        opt.step()


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_persistent_reference_is_its_own_warm_started_iterate(granularity, warmup):
    # "persistent": w is copied from theta once (at the first select, not at construction),
    # fits K0 steps on L_val alone, then every sync continues from w itself with the AdamW
    # moments kept; the first sync fits the alpha the warmed-up reference gives (ones when
    # K0 = 0). Replicated by hand step by step.
    model = TinyLM()
    val, _ = two_domain_data(16)
    K, lam, tau, gamma = 2, 0.5, 2, 0.5
    b = BLADE(model, val, gamma=gamma, tau=tau, ref_steps=K, lam=lam, ref_lr=0.05,
              val_batch_size=4, seed=3, granularity=granularity, ref_schedule="persistent",
              ref_warmup_steps=warmup)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train_step(model, opt, *batch(B=8, T=7, seed=99), torch.ones(8))  # theta moves first
    w = TinyLM()
    w.load_state_dict(model.state_dict())
    w_opt = torch.optim.AdamW(w.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.0)
    stream = ValStream(val, batch_size=4, seed=3)
    _fit_by_hand(w, w_opt, stream, warmup)
    for call in range(5):
        ids, labels = batch(B=8, T=7, seed=call)
        if call % tau == 0:
            if call == 0 and warmup == 0:
                a_fit = (torch.ones(8) if granularity == "sequence"
                         else (labels != -100).float())
            else:
                stale = (true_losses(model, ids, labels, granularity)
                         - true_losses(w, ids, labels, granularity))
                a_fit = expected_alpha(stale, labels, gamma, granularity)[0]
            _fit_by_hand(w, w_opt, stream, K, lam, (ids, labels, a_fit))
        a = b.select(ids, labels)
        for p, q in zip(w.parameters(), b.reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        excess = (true_losses(model, ids, labels, granularity)
                  - true_losses(w, ids, labels, granularity))
        assert torch.equal(a, expected_alpha(excess, labels, gamma, granularity)[0])
        train_step(model, opt, ids, labels, a)
    assert b.syncs == 3 and not b.reset_ref_optimizer
    assert b.fwdbwd_tokens > 0 and b.val.state_dict() == stream.state_dict()


def test_reset_schedule_with_warmup_fits_first_then_resets():
    # K0 applies once, before the first sync; later syncs of the "reset" schedule still start
    # from theta, so the warm-up changes only the first interval's reference.
    model = TinyLM()
    val, _ = two_domain_data(16)
    b = BLADE(model, val, gamma=0.5, tau=2, ref_steps=2, ref_lr=0.05, val_batch_size=4,
              ref_schedule="reset", ref_warmup_steps=4)
    plain = BLADE(TinyLM(), val, gamma=0.5, tau=2, ref_steps=2, ref_lr=0.05, val_batch_size=4,
                  ref_schedule="reset")
    ids, labels = batch(B=8, T=7, seed=0)
    b.select(ids, labels)
    plain.select(ids, labels)
    # K0 val-only steps, then K steps on val + the 4 rows the warmed-up reference keeps
    # (plain: all 8 rows, alpha = 1)
    assert plain.fwdbwd_tokens == 2 * (4 * 12 + 8 * 7)
    assert b.fwdbwd_tokens == 4 * 4 * 12 + 2 * (4 * 12 + 4 * 7)
    assert not all(torch.equal(p, q) for p, q in zip(b.reference.parameters(),
                                                     plain.reference.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    b.select(*batch(B=8, T=7, seed=1))
    ids, labels = batch(B=8, T=7, seed=2)
    stale = (true_losses(model, ids, labels, "sequence")
             - true_losses(b.reference, ids, labels, "sequence"))
    b.select(ids, labels)  # a sync: w <- theta, fresh moments, K steps
    w = TinyLM()
    w.load_state_dict(model.state_dict())
    w_opt = torch.optim.AdamW(w.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.0)
    stream = ValStream(val, batch_size=4, seed=0)
    for _ in range(4 + 2):  # the validation batches the warm-up and the first sync drew
        stream.next()
    _fit_by_hand(w, w_opt, stream, 2, 1.0,
                 (ids, labels, expected_alpha(stale, labels, 0.5, "sequence")[0]))
    for p, q in zip(w.parameters(), b.reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert b.syncs == 2


def test_blade_prefers_target_domain_and_refit_tracks_theta():
    torch.manual_seed(0)
    model = TinyLM()
    val, _ = two_domain_data(32, seed=1)
    tgt, noise = two_domain_data(8, seed=2)
    ids = torch.cat([tgt[:4], noise[:4], tgt[4:], noise[4:]])
    b = BLADE(model, val, gamma=0.5, tau=1, ref_steps=30, lam=1.0, ref_lr=0.05, val_batch_size=8)
    a = b.select(ids)
    assert torch.equal(a, torch.tensor([1.0] * 4 + [0.0] * 4 + [1.0] * 4 + [0.0] * 4))


# ---------------------------------------------------------------------------------------
# Training on alpha == training on the selection; padding and ignore_index
# ---------------------------------------------------------------------------------------


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _gpt64():
    models = pytest.importorskip("thresher.models.gpt", reason="thresher.models.GPT not landed")
    torch.manual_seed(0)
    cfg = models.GPTConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    return models.GPT(cfg).double()


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("arch", ["tiny", "gpt"])
def test_weighted_gradient_equals_gradient_over_selection(granularity, arch):
    model = TinyLM() if arch == "tiny" else _gpt64()
    val, _ = two_domain_data(8)
    ids, labels = batch(B=10, T=9, seed=4)
    b = BLADE(model, val, gamma=0.4, tau=1, ref_steps=2, ref_lr=0.05, val_batch_size=4,
              granularity=granularity)
    a = b.select(ids, labels)
    if granularity == "sequence":
        got = _grads(model, model.loss(ids, labels, sample_weight=a.double()))
        keep = a > 0
        assert int(keep.sum()) == 4
        want = _grads(model, model.loss(ids[keep], labels[keep]))
    else:
        got = _grads(model, model.loss(ids, labels, token_weight=a.double()))
        want = _grads(model, model.loss(ids, labels.masked_fill(a == 0, -100)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_padding_and_ignore_index(granularity):
    model = TinyLM()
    val_ids, _ = two_domain_data(6, T=9)
    val_labels = val_ids.clone()
    val_labels[:, 6:] = -100  # padded validation samples are fine too
    b = BLADE(model, (val_ids, val_labels), gamma=0.75, tau=2, ref_steps=2, ref_lr=0.05,
              val_batch_size=3, granularity=granularity)
    ids, labels = batch(B=8, T=9, seed=5)  # ragged padding, sample 4 fully padded
    labels[1, 3] = -100                    # an ignored label inside a sequence
    for _ in range(3):
        a = b.select(ids, labels)
        if granularity == "sequence":
            assert a.shape == (8,) and int(a.sum()) == 6
            assert a[4] == 0  # no target token: picked last, so not at k=6 of 8
        else:
            n_valid = int((labels[:, 1:] != -100).sum())
            assert a.shape == (8, 9) and int(a.sum()) == budget(0.75, n_valid)
            assert not bool(a[:, 0].any()) and not bool(a[labels == -100].any())
        assert torch.isfinite(b.last_scores[b.last_scores > -float("inf")]).all()
    # all padding: nothing to select at token level
    if granularity == "token":
        assert int(b.select(ids, torch.full_like(labels, -100)).sum()) == 0


# ---------------------------------------------------------------------------------------
# Checkpoint / resume
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("reset,schedule,warmup", [(True, "reset", 0), (False, "reset", 0),
                                                   (None, "persistent", 0),
                                                   (None, "persistent", 3)])
def test_state_dict_round_trip_continues_identically(granularity, reset, schedule, warmup):
    val, _ = two_domain_data(12)
    batches = [batch(B=6, T=7, seed=s) for s in range(10)]

    def fresh():
        m = TinyLM()
        b = BLADE(m, val, gamma=0.5, tau=3, ref_steps=2, ref_lr=0.05, val_batch_size=5,
                  granularity=granularity, reset_ref_optimizer=reset,
                  ref_schedule=schedule, ref_warmup_steps=warmup)
        return m, b, torch.optim.AdamW(m.parameters(), lr=0.05)

    def run(m, b, opt, bs):
        out = []
        for ids, labels in bs:
            a = b.select(ids, labels)
            train_step(m, opt, ids, labels, a)
            out.append(a)
        return out

    m, b, opt = fresh()
    run(m, b, opt, batches[:4])  # mid-interval: calls 0 and 3 synced
    ckpt = H._roundtrip({"model": m.state_dict(), "opt": opt.state_dict(), "sel": b.state_dict()})
    tail = run(m, b, opt, batches[4:])  # syncs again at calls 6 and 9
    m2, b2, opt2 = fresh()
    m2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    b2.load_state_dict(ckpt["sel"])
    tail2 = run(m2, b2, opt2, batches[4:])
    assert all(torch.equal(x, y) for x, y in zip(tail, tail2))
    for p, q in zip(list(m.parameters()) + list(b.reference.parameters()),
                    list(m2.parameters()) + list(b2.reference.parameters())):
        assert torch.equal(p, q)
    s, s2 = b.state_dict(), b2.state_dict()
    for key in ("calls", "syncs", "last_sync_call", "fwd_tokens", "fwdbwd_tokens", "val"):
        assert s[key] == s2[key], key
    assert s["calls"] == 10 and s["syncs"] == 4
    bad = BLADE(TinyLM(), val, gamma=0.5, tau=4, granularity=granularity)
    with pytest.raises(ValueError, match="tau"):
        bad.load_state_dict(ckpt["sel"])
    other = {"reset": "persistent", "persistent": "reset"}[schedule]
    bad = BLADE(TinyLM(), val, gamma=0.5, tau=3, granularity=granularity, ref_schedule=other)
    with pytest.raises(ValueError, match="ref_schedule"):
        bad.load_state_dict(ckpt["sel"])
    if schedule == "reset":  # a checkpoint from before the option: a "reset" run
        old = {k: v for k, v in ckpt["sel"].items() if k != "ref_schedule"}
        b2.load_state_dict(old)


# ---------------------------------------------------------------------------------------
# Factory and bad arguments
# ---------------------------------------------------------------------------------------


def test_factory_builds_blade():
    val, _ = two_domain_data(4)
    b = build_online_selector("blade", TinyLM(), val, granularity="token", tau=7, gamma=0.3)
    assert isinstance(b, BLADE) and b.tau == 7 and b.granularity == "token" and b.gamma == 0.3


def test_schedule_dependent_defaults():
    # the default is the persistent reference with RHO-LOSS's first fit (docs/blade.md);
    # "reset" keeps its previous behaviour: no first fit, moments cleared at every sync
    val, _ = two_domain_data(4)
    b = BLADE(TinyLM(), val)
    assert (b.ref_schedule, b.ref_warmup_steps, b.reset_ref_optimizer) == ("persistent", 200,
                                                                           False)
    assert b.ref_optimizer.defaults["lr"] == 1e-3
    r = BLADE(TinyLM(), val, ref_schedule="reset")
    assert (r.ref_warmup_steps, r.reset_ref_optimizer) == (0, True)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"gamma": 0.0}, ValueError, "gamma"),
    ({"gamma": 1.01}, ValueError, "gamma"),
    ({"gamma": -1}, ValueError, "gamma"),
    ({"tau": 0}, ValueError, "tau"),
    ({"tau": 2.5}, TypeError, "tau"),
    ({"ref_steps": 0}, ValueError, "ref_steps"),
    ({"lam": -1.0}, ValueError, "lam"),
    ({"ref_lr": 0.0}, ValueError, "ref_lr"),
    ({"granularity": "doc"}, ValueError, "granularity"),
    ({"val_batch_size": 0}, ValueError, "val_batch_size"),
    ({"reset_ref_optimizer": 1}, TypeError, "reset_ref_optimizer"),
    ({"ref_schedule": "warm"}, ValueError, "ref_schedule"),
    ({"ref_warmup_steps": -1}, ValueError, "ref_warmup_steps"),
    ({"ref_warmup_steps": 1.5}, TypeError, "ref_warmup_steps"),
    ({"ref_betas": (0.9, 1.0)}, ValueError, r"ref_betas\[1\] must be < 1"),
    ({"ref_weight_decay": -0.1}, ValueError, r"ref_weight_decay must be in \[0.0, inf\]"),
    ({"ref_grad_clip": math.inf}, ValueError, "ref_grad_clip must be a finite number"),
])
def test_bad_arguments(kwargs, exc, match):
    val, _ = two_domain_data(4)
    with pytest.raises(exc, match=match):
        BLADE(TinyLM(), val, **kwargs)


@pytest.mark.parametrize("val", [None, torch.zeros(0, 8, dtype=torch.long),
                                 torch.zeros(4, 1, dtype=torch.long)])
def test_missing_or_empty_validation_data(val):
    with pytest.raises(ValueError, match="val_data"):
        BLADE(TinyLM(), val)
