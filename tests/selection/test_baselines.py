"""Baseline scorers: scores equal their formulas computed by hand (float64 plain
cross-entropy of each trained model), registry and option errors, phase checkpoints."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thresher.selection import base as base_mod
from thresher.selection.base import available_methods, build_scorer


def hand_losses(model, samples):
    """Token-mean next-token loss by hand, float64: logits = h W^T, F.cross_entropy."""
    m = model.double()
    try:
        with torch.no_grad():
            ids, labels = samples.input_ids, samples.labels
            logits = m(ids)[:, :-1] @ m.lm_weight.t()
            tgt = labels[:, 1:]
            tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                  ignore_index=-100, reduction="none").view(tgt.shape)
            mask = (tgt != -100).double()
            return ((tok * mask).sum(1) / mask.sum(1)).numpy()
    finally:
        m.float()


def models(sc):
    return {name: (sign, m) for sign, name, m in sc.terms}


def check_formula(sc, samples, formula):
    got = sc.score(samples, batch_size=5).astype(np.float64)
    ls = {name: hand_losses(m, samples) for name, (_, m) in models(sc).items()}
    np.testing.assert_allclose(got, formula(ls), rtol=1e-4, atol=1e-4)


OPTS = dict(steps=6, batch_size=8)


def test_color_filter_formula(synthetic):
    pool, target, _ = synthetic()
    sc = build_scorer("color", vocab_size=48, seed=0, model=synthetic.TINY, **OPTS)
    sc.fit(pool, target, progress=False)
    check_formula(sc, pool, lambda l: l["prior"] - l["conditional"])
    # the conditional model is the prior fine-tuned, not a fresh model
    assert set(models(sc)) == {"prior", "conditional"}


def test_miniplm_formula(synthetic):
    pool, target, _ = synthetic()
    teacher = dict(d_model=32, n_layers=2, n_heads=2)
    sc = build_scorer("miniplm", vocab_size=48, seed=0, model=synthetic.TINY, teacher=teacher,
                      **OPTS)
    sc.fit(pool, target, progress=False)
    check_formula(sc, pool, lambda l: l["reference"] - l["teacher"])
    ms = models(sc)
    assert ms["teacher"][1].num_parameters() > ms["reference"][1].num_parameters()


def test_excess_and_loss_formulas(synthetic):
    pool, target, _ = synthetic()
    sc = build_scorer("excess", vocab_size=48, seed=0, model=synthetic.TINY, **OPTS)
    sc.fit(pool, target, progress=False)
    check_formula(sc, pool, lambda l: l["learner"] - l["reference"])
    sc = build_scorer("loss", vocab_size=48, seed=0, model=synthetic.TINY, **OPTS)
    sc.fit(pool, target, progress=False)
    check_formula(sc, pool, lambda l: -l["proxy"])


def test_loss_based_scorers_separate_noise(synthetic):
    # uniform-noise samples have high loss under a model of the target
    pool, target, noise = synthetic()
    s = build_scorer("loss", vocab_size=48, seed=0, model=synthetic.TINY, steps=40,
                     batch_size=16, lr=3e-3).fit(pool, target, progress=False).score(pool)
    auroc = (s[~noise][:, None] > s[noise][None]).mean()
    assert auroc > 0.9, auroc


def test_random_and_qurating(synthetic):
    pool, target, _ = synthetic()
    a = build_scorer("random", vocab_size=48, seed=5).fit(pool, target, progress=False).score(pool)
    b = build_scorer("random", vocab_size=48, seed=5).fit(pool, target, progress=False).score(pool)
    c = build_scorer("random", vocab_size=48, seed=6).fit(pool, target, progress=False).score(pool)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    base_opts = dict(model=synthetic.TINY, **OPTS)
    base = build_scorer("loss", vocab_size=48, seed=0, **base_opts).fit(pool, target, progress=False)
    k = 10
    top = set(np.argsort(-base.score(pool))[:k])
    cold = build_scorer("qurating", vocab_size=48, seed=0, temperature=1e-6,
                        base_options=base_opts).fit(pool, target, progress=False).score(pool)
    assert set(np.argsort(-cold)[:k]) == top  # temperature -> 0: Gumbel-top-k = top-k
    hot = build_scorer("qurating", vocab_size=48, seed=0, temperature=1e6,
                       base_options=base_opts).fit(pool, target, progress=False).score(pool)
    assert set(np.argsort(-hot)[:k]) != top  # temperature -> inf: uniform sampling


def test_random_scores_do_not_depend_on_the_shard(synthetic):
    # thresher score scores shards separately (and on different ranks): a sample's random
    # score must be the same whichever slice it is scored in, and different samples must not
    # share the sequence (the old per-call generator gave every shard the same numbers)
    pool, target, _ = synthetic()
    sc = build_scorer("random", vocab_size=48, seed=3).fit(pool, target, progress=False)
    whole = sc.score(pool)
    half = len(pool) // 2
    np.testing.assert_array_equal(np.concatenate([sc.score(pool[:half]), sc.score(pool[half:])]),
                                  whole)
    assert not np.allclose(whole[:half], whole[half:2 * half])
    # uniform on (0, 1): a Kolmogorov-Smirnov distance over many distinct (doc, offset) keys
    from thresher.selection.baselines import sample_uniform

    class Keys:
        doc_index = np.repeat(np.arange(200), 50)
        offset = np.tile(np.arange(50) * 64, 200)

    u = np.sort(sample_uniform(Keys, 11))
    assert 0 < u[0] and u[-1] < 1 and len(np.unique(u)) == u.size
    assert np.abs(u - (np.arange(u.size) + 0.5) / u.size).max() < 1.63 / np.sqrt(u.size)  # 1%
    assert abs(np.corrcoef(u, np.sort(sample_uniform(Keys, 12)))[0, 1]) > 0.99  # same law
    assert abs(np.corrcoef(sample_uniform(Keys, 11), sample_uniform(Keys, 12))[0, 1]) < 0.05


def test_registry_and_errors():
    assert {"bliss", "color", "miniplm", "excess", "loss", "random", "qurating"} <= set(
        available_methods())
    with pytest.raises(ValueError, match="method must be one of"):
        build_scorer("mates", vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        build_scorer("loss", vocab_size=0)
    with pytest.raises(ValueError, match="unknown option"):
        build_scorer("color", vocab_size=10, stepz=3)
    with pytest.raises(ValueError, match=r"temperature must be in \(0.0, inf\], got 0.0"):
        build_scorer("qurating", vocab_size=10, temperature=0.0)
    with pytest.raises(TypeError, match="temperature must be a number, got str"):
        build_scorer("qurating", vocab_size=10, temperature="2")
    sc = build_scorer("random", vocab_size=10)
    with pytest.raises(RuntimeError, match="before fit"):
        sc.score(object())
    with pytest.raises(TypeError, match="pool must be a thresher.data.Samples"):
        sc.fit([1, 2], [3])


def test_phase_checkpoints_resume_without_retraining(synthetic, tmp_path, monkeypatch):
    pool, target, _ = synthetic()
    opts = dict(vocab_size=48, seed=0, model=synthetic.TINY, **OPTS)
    first = build_scorer("color", **opts).fit(pool, target, checkpoint_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conditional.pt", "prior.pt"]

    def no_training(*a, **k):
        raise AssertionError("resume retrained a finished phase")

    monkeypatch.setattr(base_mod, "train_lm", no_training)
    again = build_scorer("color", **opts).fit(pool, target, checkpoint_dir=tmp_path, resume=True,
                                              progress=False)
    np.testing.assert_array_equal(again.score(pool), first.score(pool))
