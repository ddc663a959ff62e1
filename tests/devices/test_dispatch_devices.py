"""backend="auto" on every device picks a native backend for float32, never the reference:
a GPU run whose kernels silently fell back to plain PyTorch would pass every numerics test
in this folder and measure the wrong thing in the benchmarks."""
from __future__ import annotations

import pytest
import torch

from thresher.ops import compress, cross_entropy, lowrank

FAMILIES = {
    "cross_entropy": (cross_entropy.DISPATCH, dict(vocab=32000)),
    "lowrank": (lowrank.DISPATCH, dict(row_contiguous=True)),
    "compress": (compress.DISPATCH, dict(chunk=4096, block=256)),
}
NATIVE = {"cpu": {"cpu"}, "cuda": {"triton", "cuda"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_picks_a_native_backend(device_under_test, family):
    dispatch, problem = FAMILIES[family]
    chosen = dispatch.select("auto", device_under_test, torch.float32, **problem)
    native = NATIVE[device_under_test.type]
    reasons = {b: dispatch.reasons(b, device_under_test, torch.float32, **problem)
               for b in native}
    assert chosen in native, f"{family} on {device_under_test}: auto chose {chosen!r}; {reasons}"
