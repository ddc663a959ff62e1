"""thresher.selection.metrics against brute-force definitions."""
import numpy as np
import pytest

from thresher.selection.metrics import auroc, tokens_to_reach, tokens_to_target_speedup


def brute_auroc(s, pos):
    p, n = s[pos][:, None], s[~pos][None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=200).astype(float)  # many ties
    pos = rng.random(200) < 0.3
    assert auroc(s, pos) == pytest.approx(brute_auroc(s, pos), abs=1e-12)


def test_auroc_extremes_and_errors():
    assert auroc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auroc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert np.isnan(auroc([1, 2], [True, True]))
    with pytest.raises(ValueError, match="same length"):
        auroc([1, 2, 3], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1, float("nan")], [True, False])


def test_tokens_to_reach_interpolates():
    curve = [(0, 5.0), (100, 4.0), (200, 3.0)]
    assert tokens_to_reach(curve, 3.5) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 5.0) == 0.0
    assert tokens_to_reach(curve, 2.0) == float("inf")


def test_speedup():
    base = [(0, 5.0), (100, 4.0), (200, 3.0)]
    fast = [(0, 5.0), (100, 3.0), (200, 2.5)]
    assert tokens_to_target_speedup(base, fast) == pytest.approx(2.0)
    assert tokens_to_target_speedup(base, base) == pytest.approx(1.0)
    assert tokens_to_target_speedup(base, [(0, 5.0), (200, 4.0)]) == 0.0
    with pytest.raises(ValueError, match="non-decreasing"):
        tokens_to_target_speedup([(100, 1.0), (0, 2.0)], base)
