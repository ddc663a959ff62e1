"""The compression payload layouts (thresher.core.layouts), which the ops and the Triton
launchers share, and the one-module-per-job split of the op families."""
from __future__ import annotations

import subprocess
import sys

import pytest

from thresher.core import layouts
from thresher.ops import compress as C


def test_layouts_import_no_torch():
    # the kernels read the layouts without pulling in the ops (or torch) at import
    code = "import sys, thresher.core.layouts; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ops_compress_reexports_the_one_layout():
    assert C.TopKLayout is layouts.TopKLayout
    assert C.QuantLayout is layouts.QuantLayout
    assert C.index_bits is layouts.index_bits
    assert C.topk_layout is layouts.topk_layout


@pytest.mark.parametrize("n, k, chunk, bits", [(0, 4, 64, 2), (100, 4, 64, 2), (5000, 64, 4096, 2),
                                               (9000, 33, 5000, 8), (7, 64, 4096, 4)])
def test_topk_layout_offsets(n, k, chunk, bits):
    lay = layouts.TopKLayout(n, k, chunk, bits)
    assert lay.total == C.topk_nbytes(n, k, chunk, bits)
    if n == 0:
        assert lay.n_chunks == 0 and lay.total == 0
        return
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    ks = [min(k, m) for m in sizes]
    w = layouts.index_bits(chunk)
    assert lay.values_off == 4 * len(sizes)
    assert lay.indices_off == lay.values_off + sum(-(-kc * bits // 8) for kc in ks)
    assert lay.total == lay.indices_off + sum(-(-kc * w // 8) for kc in ks)
    assert lay.n_selected == sum(ks)


@pytest.mark.parametrize("scaling", ["absmax", "meanstd"])
@pytest.mark.parametrize("n, block, bits", [(0, 256, 8), (999, 100, 2), (5, 256, 4), (4097, 4096, 4)])
def test_quant_layout_offsets(n, block, bits, scaling):
    lay = layouts.QuantLayout(n, block, bits, scaling)
    assert lay.total == C.quant_nbytes(n, bits, block, scaling)
    nb = -(-n // block)
    floats = 4 * nb * (2 if scaling == "meanstd" else 1)
    assert lay.codes_off == floats
    assert lay.scale_off == (4 * nb if scaling == "meanstd" else 0)
    assert lay.total == floats + sum(-(-min(block, n - s) * bits // 8) for s in range(0, n, block))


def test_packed_nbytes_and_index_bits():
    assert [layouts.packed_nbytes(c, w) for c, w in ((0, 12), (1, 12), (2, 12), (64, 2))] == [0, 2, 3, 16]
    assert [layouts.index_bits(c) for c in (1, 4096, 4097, 65536, 65537)] == [12, 12, 16, 16, 32]


@pytest.mark.parametrize("family, prefix, reference", [
    ("cross_entropy", "_ce", "reference_cross_entropy_rows"),
    ("lowrank", "_lowrank", "reference_lowrank_adam_step"),
    ("compress", "_compress", "reference_topk_encode"),
])
def test_each_family_is_split_by_job(family, prefix, reference):
    # the public module re-exports the one dispatcher (tests/conftest.py reads
    # thresher.ops.<family>.DISPATCH) and the reference, each from its own module
    import importlib

    public = importlib.import_module(f"thresher.ops.{family}")
    backends = importlib.import_module(f"thresher.ops.{prefix}_backends")
    assert public.DISPATCH is backends.DISPATCH
    assert getattr(public, reference).__module__ == f"thresher.ops.{prefix}_reference"
