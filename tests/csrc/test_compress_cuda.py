"""The selection logic of csrc/cuda/compress.cu's top-k kernel without a GPU.

nvcc compiles the kernel (tests/csrc/test_cuda_compile.py), and its per-element maths is
common/compress.h, which the CPU kernel shares. What neither covers is the warp algorithm
itself: the MSB-first bitwise radix select with its early exit, and the ballot/popc emission
that hands ties to the lowest indices. This test replays that algorithm step for step
(warp-wide sums and ballots as numpy reductions over 32-lane rounds) and checks it chooses
exactly the set of the reference backend, including heavy ties, all-equal chunks, k >= len.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thresher.ops import compress as C


def _warp_select(v: np.ndarray, kk: int) -> np.ndarray:
    """compress.cu topk_encode_kernel steps 2-3; returns the chosen indices in emit order."""
    keys = v.view(np.uint32) & np.uint32(0x7FFFFFFF)
    n = keys.size
    prefix, hi, need = 0, 0, kk
    if kk < n:
        for b in range(30, -1, -1):
            bit = 1 << b
            match = (keys & np.uint32(hi)) == prefix
            cand = int(match.sum())  # __reduce_add_sync over the lanes' counts
            if cand == need:
                break
            cnt = int((match & ((keys & np.uint32(bit)) != 0)).sum())
            if cnt >= need:
                prefix |= bit
            else:
                need -= cnt
            hi |= bit
    else:
        need = n
    chosen, taken_eq = [], 0
    for r in range(0, n, 32):  # 32 elements a round, lane = i - r
        k = keys[r:r + 32] & np.uint32(hi)
        gt, eq = k > prefix, k == prefix
        eq_rank = taken_eq + np.cumsum(eq) - eq  # popc(eqmask & lanemask_lt)
        sel = gt | (eq & (eq_rank < need))
        chosen.extend((r + np.nonzero(sel)[0]).tolist())
        taken_eq += int(eq.sum())
    return np.array(chosen, dtype=np.int64)


def _reference_chosen(v: np.ndarray, kk: int) -> np.ndarray:
    x = torch.from_numpy(v.copy())
    p = C.topk_encode(x, k=kk, chunk=v.size, bits=8, backend="reference")
    lay = C.topk_layout(v.size, kk, v.size, 8)
    idx = C.unpack_indices(p[lay.indices_off:][None], v.size, lay.k_last)[0]
    return idx.numpy()


@pytest.mark.parametrize("kind", ["gauss", "ties", "equal", "zeros", "signs", "nan-free-extremes"])
@pytest.mark.parametrize("n, k", [(4096, 64), (1000, 999), (37, 64), (4096, 1), (100, 100), (5000, 33)])
def test_warp_select_matches_reference(kind, n, k):
    g = np.random.default_rng(n * 31 + k)
    if kind == "gauss":
        v = g.standard_normal(n).astype(np.float32)
    elif kind == "ties":
        v = g.integers(-3, 4, n).astype(np.float32)
    elif kind == "equal":
        v = np.full(n, 1.5, np.float32)
    elif kind == "zeros":
        v = np.zeros(n, np.float32)
    elif kind == "signs":  # +x and -x tie on |x|
        v = np.repeat(g.standard_normal((n + 1) // 2).astype(np.float32), 2)[:n]
        v[1::2] *= -1
    else:
        v = g.choice(np.array([0.0, 1e-45, 3.4e38, -3.4e38, 1.0], np.float32), n)
    kk = min(k, n)
    got = _warp_select(v, kk)
    assert got.size == kk
    assert np.array_equal(got, _reference_chosen(v, kk))
