"""The compression payload layouts (thresher.core.layouts), which the ops and the Triton
launchers share, and the one-module-per-job split of the cross-entropy op."""
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


def test_cross_entropy_has_one_dispatcher():
    from thresher.ops import _ce_autograd, cross_entropy

    assert cross_entropy.DISPATCH is _ce_autograd.DISPATCH
    assert cross_entropy.reference_cross_entropy_rows.__module__ == "thresher.ops._ce_reference"
