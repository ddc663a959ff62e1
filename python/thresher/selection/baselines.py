"""Offline selection baselines as ``Scorer``s: random, loss, excess (RHO-LOSS with a static
reference), color (CoLoR-Filter), miniplm (MiniPLM difference sampling) and qurating
(QuRating-style Gumbel keys over any base method). Higher score = keep. Which models each
trains and what it scores: docs/algorithms.md §4 "Offline selection baselines".
"""
from __future__ import annotations

import numpy as np

from thresher.core.checks import check_float

from .base import Scorer, build_scorer, per_sample_losses, register_scorer

__all__ = ["RandomScorer", "LossScorer", "ExcessLossScorer", "ColorFilterScorer",
           "MiniPLMScorer", "QuRatingScorer"]

_TRAIN_OPTS = ("model", "steps", "batch_size", "lr", "weight_decay")


def _seq_len(samples):
    return samples.input_ids.size(1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit mixer (uint64 in, uint64 out)."""
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    return x ^ (x >> np.uint64(31))


def sample_uniform(samples, seed: int) -> np.ndarray:
    """One uniform number in (0, 1) per sample, a pure function of the seed and the sample's
    identity -- ``(doc_index, offset)`` for ``thresher.data.Samples``, else its token ids --
    so a sample gets the same number whichever shard or rank scores it. (A generator seeded
    once per ``score`` call hands every shard the same sequence: a sharded random selection
    would pick the same positions in every shard.) The top 53 bits of the mixed key give the
    float."""
    with np.errstate(over="ignore"):
        if hasattr(samples, "doc_index") and hasattr(samples, "offset"):
            key = ((np.asarray(samples.doc_index).astype(np.uint64) << np.uint64(32))
                   + np.asarray(samples.offset).astype(np.uint64))
        else:  # content key: fold the token ids of each row through the mixer
            ids = samples.input_ids.numpy().astype(np.uint64)
            key = np.zeros(ids.shape[0], dtype=np.uint64)
            for col in ids.T:
                key = _mix64(key ^ col) + np.uint64(0x9E3779B97F4A7C15)
        x = _mix64(key ^ (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


@register_scorer("random")
class RandomScorer(Scorer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self._check_options(())

    def _fit(self, pool, target, progress):
        pass

    def _score(self, samples, batch_size, progress):
        return sample_uniform(samples, self.seed).astype(np.float32)


class _LossDifferenceScorer(Scorer):
    """Score = sum_k sign_k * l_{model_k}(x); subclasses fill ``self.terms`` in ``_fit``."""

    def _score(self, samples, batch_size, progress):
        out = np.zeros(samples.input_ids.size(0), dtype=np.float64)
        for sign, name, model in self.terms:
            out += sign * per_sample_losses(model, samples, batch_size=batch_size,
                                            progress=progress, desc=f"{self.method}:{name}")
        return out


@register_scorer("loss")
class LossScorer(_LossDifferenceScorer):
    """Options: model ("tiny"), steps (200), batch_size, lr, weight_decay."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._check_options(_TRAIN_OPTS)

    def _fit(self, pool, target, progress):
        proxy = self._phase("proxy", lambda: self._lm(self._opt("model", "tiny"), _seq_len(pool)),
                            lambda m: self._train(m, target, self._opt("steps", 200), progress,
                                                  "loss: proxy on target"))
        self.terms = [(-1.0, "proxy", proxy)]


@register_scorer("excess")
class ExcessLossScorer(_LossDifferenceScorer):
    """RHO-LOSS with a static reference. Options: model, steps (learner on the pool),
    reference (defaults to ``model``), ref_steps (defaults to ``steps``), batch_size, lr."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._check_options(_TRAIN_OPTS + ("reference", "ref_steps"))

    def _fit(self, pool, target, progress):
        T, steps = _seq_len(pool), self._opt("steps", 200)
        ref = self._phase("reference",
                          lambda: self._lm(self._opt("reference", self._opt("model", "tiny")), T, 1),
                          lambda m: self._train(m, target, self._opt("ref_steps", steps), progress,
                                                "excess: reference on target", 1))
        learner = self._phase("learner", lambda: self._lm(self._opt("model", "tiny"), T),
                              lambda m: self._train(m, pool, steps, progress,
                                                    "excess: learner on pool"))
        self.terms = [(1.0, "learner", learner), (-1.0, "reference", ref)]


@register_scorer("color")
class ColorFilterScorer(_LossDifferenceScorer):
    """CoLoR-Filter. Options: model / prior (the prior's architecture or a ready model),
    steps (prior on the pool), finetune_steps (conditional on the target; defaults to
    ``steps // 2``), finetune_lr (defaults to lr), batch_size, lr."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._check_options(_TRAIN_OPTS + ("prior", "finetune_steps", "finetune_lr"))

    def _fit(self, pool, target, progress):
        T, steps = _seq_len(pool), self._opt("steps", 200)
        spec = self._opt("prior", self._opt("model", "tiny"))
        prior = self._phase("prior", lambda: self._lm(spec, T),
                            lambda m: self._train(m, pool, steps, progress, "color: prior on pool"))

        def build_cond():
            m = self._lm(spec, T)
            m.load_state_dict(prior.state_dict())
            return m

        cond = self._phase("conditional", build_cond,
                           lambda m: self._train(m, target, self._opt("finetune_steps", steps // 2),
                                                 progress, "color: conditional on target", 1,
                                                 lr=self._opt("finetune_lr", None)))
        self.terms = [(1.0, "prior", prior), (-1.0, "conditional", cond)]


@register_scorer("miniplm")
class MiniPLMScorer(_LossDifferenceScorer):
    """MiniPLM difference sampling. Options: teacher ("small": the larger LM), model /
    reference ("tiny"), steps (both on the target), teacher_steps (defaults to steps),
    batch_size, lr. Keep the top fraction (the paper keeps alpha = 0.5)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._check_options(_TRAIN_OPTS + ("reference", "teacher", "teacher_steps"))

    def _fit(self, pool, target, progress):
        T, steps = _seq_len(pool), self._opt("steps", 200)
        teacher = self._phase("teacher", lambda: self._lm(self._opt("teacher", "small"), T, 2),
                              lambda m: self._train(m, target, self._opt("teacher_steps", steps),
                                                    progress, "miniplm: teacher on target", 2))
        ref = self._phase("reference",
                          lambda: self._lm(self._opt("reference", self._opt("model", "tiny")), T, 1),
                          lambda m: self._train(m, target, steps, progress,
                                                "miniplm: reference on target", 1))
        self.terms = [(1.0, "reference", ref), (-1.0, "teacher", teacher)]


@register_scorer("qurating")
class QuRatingScorer(Scorer):
    """QuRating-style temperature sampling over any score: returns Gumbel-top-k keys
    ``z(x)/temperature + G`` (z = the base method's z-scored score, G ~ Gumbel(0, 1) from the
    seed and each sample's identity, so shards agree; z is standardised within the scored
    slice), so ``select_topk`` on them samples without replacement with probabilities
    proportional to ``exp(z/temperature)``. The same thing as ``select_gumbel`` applied to
    the base scores (strategies.py); this form lets the pipeline stay "score, then top-k".
    Options: base ("loss"), temperature (2.0, QuRating's default), base_options (dict)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._check_options(("base", "temperature", "base_options"))
        self.temperature = check_float("temperature", self._opt("temperature", 2.0), 0.0,
                                       lo_open=True)
        self.base = build_scorer(self._opt("base", "loss"), vocab_size=self.vocab_size,
                                 seed=self.seed, device=self.device,
                                 **self._opt("base_options", {}))

    def _fit(self, pool, target, progress):
        sub = None if self._ckpt_dir is None else self._ckpt_dir / "base"
        self.base.fit(pool, target, checkpoint_dir=sub, resume=self._resume, progress=progress)

    def _score(self, samples, batch_size, progress):
        s = self.base.score(samples, batch_size=batch_size, progress=progress).astype(np.float64)
        z = (s - s.mean()) / (s.std() + 1e-12) if s.size > 1 else s * 0
        g = -np.log(-np.log(sample_uniform(samples, self.seed + 7919)))  # Gumbel(0, 1)
        return z / self.temperature + g
