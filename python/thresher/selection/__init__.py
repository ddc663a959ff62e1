"""thresher.selection: scorers, selection strategies, BLISS, BLADE and the baselines.

Offline: ``build_scorer(method, vocab_size=..., **options).fit(pool, target).score(samples)``
(methods: ``available_methods()``), then a strategy (``select_topk``, ``select_gumbel``,
``select_threshold``). Online (per training batch): ``build_online_selector``.
"""
from thresher.core.lazy import lazy_exports

# public name -> the submodule that defines it (imported on first use: no torch at import)
_EXPORTS = {
    'Scorer': 'base',
    'available_methods': 'base',
    'build_scorer': 'base',
    'register_scorer': 'base',
    'ColorFilterScorer': 'baselines',
    'ExcessLossScorer': 'baselines',
    'LossScorer': 'baselines',
    'MiniPLMScorer': 'baselines',
    'QuRatingScorer': 'baselines',
    'RandomScorer': 'baselines',
    'BlissConfig': 'bliss',
    'BlissScorer': 'bliss',
    'bliss_hypergradient': 'bliss',
    'build_online_selector': 'online',
    'select_gumbel': 'strategies',
    'select_threshold': 'strategies',
    'select_topk': 'strategies',
}

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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
