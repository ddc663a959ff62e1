"""Selection strategies: top-k, Gumbel-top-k (T -> 0 equals top-k; it samples without
replacement from softmax(s/T)), threshold; bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

# the module itself (thresher.selection's exports are owned by another helper)
from thresher.selection import strategies as S


def test_topk_counts_order_and_ties():
    s = np.array([0.5, 3.0, -1.0, 3.0, 2.0, np.inf, -np.inf])
    assert S.select_topk(s, 3 / 7).tolist() == [1, 3, 5]
    assert S.select_topk(s, 2 / 7).tolist() == [1, 5]  # tie at 3.0 goes to the lower index
    assert S.select_topk(s, 1.0).tolist() == list(range(7))
    assert S.select_topk(s, 1e-9).tolist() == [5]  # at least one
    assert S.num_selected(10, 0.25) == 3 and S.num_selected(10, 0.24) == 2  # round half up
    out = S.select_topk(torch.tensor([1.0, 2.0]), 0.5)
    assert out.dtype == np.int64 and out.tolist() == [1]


@pytest.mark.parametrize("n,frac", [(1000, 0.2), (37, 0.5), (5, 1.0)])
def test_gumbel_low_temperature_equals_topk(n, frac):
    s = np.random.default_rng(n).standard_normal(n)  # distinct scores
    top = S.select_topk(s, frac)
    gap = np.min(np.diff(np.sort(s)))
    for seed in range(3):
        assert np.array_equal(S.select_gumbel(s, frac, 0.0, seed), top)
        # Gumbel noise beyond ~40 is impossible in float64 sampling (-log(-log(1-2^-53)) ~ 36.7)
        assert np.array_equal(S.select_gumbel(s, frac, gap / 100.0, seed), top)
    assert not np.array_equal(S.select_gumbel(s, frac, 1e3, 0), top) or frac == 1.0


def test_gumbel_is_sampling_without_replacement_from_softmax():
    # k = 1: P(i selected) = softmax(s / T)_i  (Gumbel-max); checked by frequency
    s = np.log(np.array([0.1, 0.2, 0.3, 0.4])) * 2.0
    T, trials = 2.0, 4000
    counts = np.zeros(4)
    for seed in range(trials):
        counts[S.select_gumbel(s, 0.25, T, seed)] += 1
    p = np.exp(s / T) / np.exp(s / T).sum()
    assert np.all(np.abs(counts / trials - p) < 4 * np.sqrt(p * (1 - p) / trials))
    # deterministic from the seed, and sorted/unique
    a = S.select_gumbel(np.arange(100.0), 0.3, 50.0, 7)
    assert np.array_equal(a, S.select_gumbel(np.arange(100.0), 0.3, 50.0, 7))
    assert len(a) == 30 and (np.diff(a) > 0).all()


def test_threshold():
    s = np.array([0.1, 0.5, 0.9, 0.5, -np.inf])
    assert S.select_threshold(s, 0.5).tolist() == [1, 2, 3]
    assert S.select_threshold(s, 2.0).tolist() == []
    assert S.select_threshold(s, -math.inf).tolist() == [0, 1, 2, 3, 4]


def test_bad_inputs():
    s = np.array([1.0, 2.0, 3.0])
    for frac in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0.0, 1.0\], got"):
            S.select_topk(s, frac)
        with pytest.raises(ValueError, match="fraction"):
            S.select_gumbel(s, frac, 1.0, 0)
    with pytest.raises(ValueError, match="fraction must be a finite number, got nan"):
        S.select_topk(s, float("nan"))
    with pytest.raises(TypeError, match="fraction must be a number, got str"):
        S.select_topk(s, "0.2")
    assert S.select_topk(s, np.float32(0.5)).tolist() == [1, 2]  # numpy numbers are numbers
    with pytest.raises(ValueError, match="NaN.*index 1"):
        S.select_topk(np.array([1.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        S.select_threshold(np.array([np.nan]), 0.0)
    with pytest.raises(ValueError, match="1-D"):
        S.select_topk(np.ones((2, 2)), 0.5)
    with pytest.raises(ValueError, match="empty"):
        S.select_topk(np.array([]), 0.5)
    with pytest.raises(TypeError, match="numeric"):
        S.select_topk(np.array(["a"]), 0.5)
    for t in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            S.select_gumbel(s, 0.5, t, 0)
    with pytest.raises(ValueError, match="threshold"):
        S.select_threshold(s, float("nan"))
