"""Selection strategies: turn scores (higher = keep) into a sorted array of kept indices.

:func:`select_topk` (ties to the lower index), :func:`select_gumbel` (Gumbel-top-k: a sample
without replacement from ``softmax(s / T)``; ``T = 0`` is top-k) and :func:`select_threshold`.
Scores may be +-inf; NaN is an error. docs/algorithms.md §4 "Selection strategies".
"""
from __future__ import annotations

import math

import numpy as np

from thresher.core.checks import check_float, check_range

__all__ = ["select_topk", "select_gumbel", "select_threshold", "num_selected", "STRATEGIES"]

STRATEGIES = ("topk", "gumbel", "threshold")


def _check_scores(scores) -> np.ndarray:
    try:
        import torch

        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    s = np.asarray(scores)
    if s.dtype == object or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"scores must be a numeric array, got dtype {s.dtype}")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per item), got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores is empty: nothing to select from")
    s = s.astype(np.float64)
    nan = np.isnan(s)
    if nan.any():
        raise ValueError(f"scores contain {int(nan.sum())} NaN value(s) (first at index {int(np.flatnonzero(nan)[0])})")
    return s


def num_selected(n: int, fraction: float) -> int:
    """``k = round(fraction * n)``, at least 1; ``fraction`` must be in (0, 1]."""
    fraction = check_float("fraction", fraction, 0.0, 1.0, lo_open=True)
    return max(1, min(n, int(np.floor(fraction * n + 0.5))))


def _top(keys: np.ndarray, k: int) -> np.ndarray:
    # stable sort of -keys: equal keys keep index order, so ties go to the lower index
    return np.sort(np.argsort(-keys, kind="stable")[:k]).astype(np.int64)


def select_topk(scores, fraction: float) -> np.ndarray:
    s = _check_scores(scores)
    return _top(s, num_selected(len(s), fraction))


def select_gumbel(scores, fraction: float, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
    s = _check_scores(scores)
    k = num_selected(len(s), fraction)
    temperature = check_float("temperature", temperature, 0.0)
    if temperature == 0:
        return _top(s, k)
    g = np.random.default_rng(seed).gumbel(size=len(s))
    with np.errstate(invalid="ignore"):
        keys = s + temperature * g  # +-inf scores stay +-inf
    return _top(keys, k)


def select_threshold(scores, threshold: float) -> np.ndarray:
    s = _check_scores(scores)
    check_range("threshold", threshold, -math.inf, math.inf)  # any number but NaN
    return np.flatnonzero(s >= threshold).astype(np.int64)
