"""Compression encode / decode / quantise on every device x backend x claimed dtype
(tests/conftest.py: ``backend_case``). The ops promise the same bytes on every backend
(thresher.ops.compress: every step is one IEEE-rounded float32 operation), so the truth here
is the CPU reference backend, bit for bit: payload, the updated error buffer, decoded values
and counts. The reference itself is checked against float64 models in tests/ops."""
from __future__ import annotations

import pytest
import torch

from thresher.ops import compress as C
from thresher.ops.compress import DISPATCH  # noqa: F401 - read by tests/conftest.py

TOPK = [  # n, k, chunk, bits: default layout, ragged last chunk, k > chunk, 16-bit indices
    (3 * 4096 + 77, 64, 4096, 2), (700, 7, 100, 4), (37, 64, 4096, 8), (9000, 33, 5000, 8),
    (20, 5, 5, 8),
]
QUANT = [(3000, 8, 256, "absmax"), (999, 2, 100, "meanstd"), (5, 4, 256, "meanstd"),
         (4097, 4, 4096, "absmax")]


def inputs(n, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2
    x = (x.round() if ties else x).to(dtype)
    return x, torch.randn(n, generator=g) * 0.3


def assert_same(what, ref, got):
    for name, a, b in zip(("payload", "error", "decoded", "count"), ref, got):
        b = b.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {name}: {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            raise AssertionError(f"{what} {name}: {int((diff > 0).sum())} of {a.numel()} differ "
                                 f"from the CPU reference, max {float(diff.max()):.3e}")


def topk_run(x, e0, k, chunk, bits, backend, device):
    x, e = x.to(device), None if e0 is None else e0.clone().to(device)
    p = C.topk_encode(x, e, k=k, chunk=chunk, bits=bits, backend=backend)
    out = torch.randn(x.numel(), generator=torch.Generator().manual_seed(2)).to(device)
    cnt = torch.zeros(x.numel(), dtype=torch.int32, device=device)
    d = C.topk_decode(p, x.numel(), k=k, chunk=chunk, bits=bits, out=out, count=cnt,
                      backend=backend)
    return p, (torch.zeros(0) if e is None else e), d, cnt


def same_as_cpu_reference(backend_case, run, x, e, *settings):
    """``run(x, e, *settings, backend, device)`` on the case's device and backend gives the
    CPU reference's payload, error buffer and decoded values, bit for bit."""
    dev, be, _ = backend_case
    assert_same(be, run(x, e, *settings, "reference", "cpu"), run(x, e, *settings, be, dev))


@pytest.mark.parametrize("n,k,chunk,bits", TOPK)
@pytest.mark.parametrize("error", [True, False])
def test_topk_encode_decode(backend_case, n, k, chunk, bits, error):
    x, e = inputs(n, backend_case.dtype, n + k)
    same_as_cpu_reference(backend_case, topk_run, x, e if error else None, k, chunk, bits)


def test_topk_ties_go_to_the_lowest_index(backend_case):
    x, e = inputs(2048 + 5, backend_case.dtype, 3, ties=True)
    same_as_cpu_reference(backend_case, topk_run, x, e * 0, 50, 1024, 2)


def quant_run(x, e0, bits, block, scaling, backend, device):
    x, e = x.to(device), None if e0 is None else e0.clone().to(device)
    p = C.quantize_blockwise(x, e, bits=bits, block=block, scaling=scaling, backend=backend)
    out = torch.randn(x.numel(), generator=torch.Generator().manual_seed(2)).to(device)
    d = C.dequantize_blockwise(p, x.numel(), bits=bits, block=block, scaling=scaling, out=out,
                               backend=backend)
    return p, (torch.zeros(0) if e is None else e), d


@pytest.mark.parametrize("n,bits,block,scaling", QUANT)
@pytest.mark.parametrize("error", [True, False])
def test_quantise_dequantise(backend_case, n, bits, block, scaling, error):
    x, e = inputs(n, backend_case.dtype, n + bits)
    same_as_cpu_reference(backend_case, quant_run, x, e if error else None, bits, block, scaling)


def test_non_finite_input_raises(backend_case):
    dev, be, dt = backend_case
    x = torch.randn(300).to(dt)
    x[17] = float("nan")
    for call in (lambda: C.topk_encode(x.to(dev), k=4, chunk=100, backend=be),
                 lambda: C.quantize_blockwise(x.to(dev), block=100, backend=be)):
        with pytest.raises(ValueError, match="finite"):
            call()
