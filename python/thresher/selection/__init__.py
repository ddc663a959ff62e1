"""thresher.selection: scorers, selection strategies, BLISS, BLADE and the baselines.

Offline: ``build_scorer(method, vocab_size=..., **options).fit(pool, target).score(samples)``
(methods: ``available_methods()``), then a strategy (``select_topk``, ``select_gumbel``,
``select_threshold``). Online (per training batch): ``build_online_selector``.
"""
from .base import Scorer, available_methods, build_scorer, register_scorer
from .baselines import (
    ColorFilterScorer,
    ExcessLossScorer,
    LossScorer,
    MiniPLMScorer,
    QuRatingScorer,
    RandomScorer,
)
from .bliss import BlissConfig, BlissScorer, bliss_hypergradient
from .online import build_online_selector
from .strategies import select_gumbel, select_threshold, select_topk

__all__ = [
    "Scorer",
    "available_methods",
    "build_scorer",
    "register_scorer",
    "RandomScorer",
    "LossScorer",
    "ExcessLossScorer",
    "ColorFilterScorer",
    "MiniPLMScorer",
    "QuRatingScorer",
    "BlissConfig",
    "BlissScorer",
    "bliss_hypergradient",
    "build_online_selector",
    "select_topk",
    "select_gumbel",
    "select_threshold",
]
