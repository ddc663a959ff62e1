"""Metrics the selection experiments, the demo and users report (one implementation each).

* :func:`auroc` -- how well scores separate two groups (e.g. clean vs corrupted documents).
* :func:`tokens_to_reach` / :func:`tokens_to_target_speedup` -- the data-efficiency figure:
  tokens a baseline run needs for its final validation loss, divided by the tokens another run
  needs to reach the same loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Curve = Sequence[tuple[float, float]]  # (tokens seen, validation loss), tokens increasing


def auroc(scores, positive) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (the Mann-Whitney U
    statistic over n_pos * n_neg), from average ranks in O(n log n). NaN if a group is empty."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    if s.shape != pos.shape:
        raise ValueError(f"scores and positive must have the same length, got {s.size} and {pos.size}")
    if np.isnan(s).any():
        raise ValueError("scores must not contain NaN")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # average rank (1-based) over each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _check_curve(name: str, curve: Curve) -> np.ndarray:
    a = np.asarray(curve, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty sequence of (tokens, loss) pairs")
    if np.any(np.diff(a[:, 0]) < 0):
        raise ValueError(f"{name} tokens must be non-decreasing")
    return a


def tokens_to_reach(curve: Curve, level: float) -> float:
    """Tokens at which ``curve`` first reaches ``loss <= level``, linearly interpolated
    between evaluations; ``inf`` if it never does."""
    a = _check_curve("curve", curve)
    hit = np.flatnonzero(a[:, 1] <= level)
    if hit.size == 0:
        return float("inf")
    i = int(hit[0])
    if i == 0:
        return float(a[0, 0])
    (t0, l0), (t1, l1) = a[i - 1], a[i]
    frac = (l0 - level) / (l0 - l1) if l0 != l1 else 1.0
    return float(t0 + frac * (t1 - t0))


def tokens_to_target_speedup(baseline: Curve, curve: Curve) -> float:
    """``tokens_to_reach(baseline, final baseline loss) / tokens_to_reach(curve, same)``:
    > 1 when ``curve`` reaches the baseline's final loss with fewer tokens; 0 if it never does."""
    b = _check_curve("baseline", baseline)
    level = float(b[-1, 1])
    need = tokens_to_reach(b, level)
    got = tokens_to_reach(curve, level)
    if not np.isfinite(got):
        return 0.0
    return float(need / max(got, 1e-12))
