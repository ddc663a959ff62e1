"""thresher.comm codecs: round trips, exact byte counts, error feedback, accumulation."""
from __future__ import annotations

import math

import pytest
import torch

from thresher.comm import LowRankCodec, Packed, QuantCodec, TopKCodec
from thresher.ops import compress as C

CODECS = [
    TopKCodec(),
    TopKCodec(k=16, chunk=1000, bits=8),
    QuantCodec(),
    QuantCodec(bits=2, block=64, scaling="meanstd"),
    QuantCodec(bits=4, block=100),
    LowRankCodec(rank=4),
    LowRankCodec(rank=3, method="svd"),
]


def _x(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("shape", [(64, 300), (5000,), (3, 7, 11), (0,)], ids=str)
def test_round_trip_shapes_and_exact_nbytes(codec, shape):
    x = _x(shape)
    packed = codec.encode(x)
    assert isinstance(packed, Packed)
    assert packed.nbytes == codec.nbytes(x.shape) == packed.data.numel()
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == x.dtype
    again = codec.unpack(packed.data.clone(), x.shape, x.dtype)
    assert torch.equal(codec.decode(again), y)


def test_byte_formulas():
    assert TopKCodec().nbytes((4096 * 10,)) == 10 * (4 + 16 + 96)
    assert TopKCodec(k=64, chunk=65536, bits=4).nbytes((65536,)) == 4 + 32 + 128
    assert QuantCodec(bits=8, block=256).nbytes((1000,)) == 4 * 4 + 1000
    assert QuantCodec(bits=2, block=256, scaling="meanstd").nbytes((1000,)) == 8 * 4 + 3 * 64 + 58
    p, q, r = 300, 64, 4  # side "right": R (p x r) and Q (q x r) in float32
    assert LowRankCodec(rank=r).nbytes((p, q)) == 4 * r * (p + q)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_error_feedback_conserves_mass(codec):
    x = _x((40, 250), seed=1)
    e0 = _x((40, 250), seed=2) * 0.1
    e = e0.clone()
    y = codec.decode(codec.encode(x, error=e))
    t = e0 + x
    gap = (e.double() + y.double() - t.double()).abs()
    tol = 1e-5 if isinstance(codec, LowRankCodec) else 0  # GEMM rounding for low rank
    assert bool((gap <= e.double().abs() * 2.0**-24 + tol + 1e-30).all()), float(gap.max())


def test_lossless_cases():
    # 8-bit values on the grid, blockwise
    L = 256
    q = torch.randint(0, L, (4, 256), generator=torch.Generator().manual_seed(0))
    q[:, 0], q[:, 1] = 0, L - 1
    x = ((2 * q + 1 - L).float() * 2.0**-7).reshape(-1)
    codec = QuantCodec(bits=8, block=256)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    # top-k with k = chunk on the grid
    codec = TopKCodec(k=256, chunk=256, bits=8)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    # low rank at full rank
    m = _x((20, 6), seed=3)
    codec = LowRankCodec(rank=6, method="svd")
    assert torch.allclose(codec.decode(codec.encode(m)), m, atol=1e-5)


def test_decode_accumulates_into_out_of_any_float_dtype():
    codec = TopKCodec(k=8, chunk=128)
    x = _x((30, 20))
    p = codec.encode(x)
    y = codec.decode(p)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = torch.ones(30, 20, dtype=dtype)
        assert codec.decode(p, out=out) is out
        # decoded in float32, then added in out's dtype (one rounding)
        assert torch.equal(out, torch.ones(30, 20, dtype=dtype).add_(y.to(dtype)))
    out = torch.ones(20, 30).t()  # non-contiguous
    codec.decode(p, out=out)
    assert torch.equal(out, 1 + y)


def test_topk_error_feedback_sends_everything_eventually():
    # x = 0 after the first step: the residual drains, so the sum of what was sent
    # converges to the first x
    codec = TopKCodec(k=64, chunk=512, bits=8)
    x = _x((4096,), seed=4)
    e = torch.zeros(4096)
    sent = codec.decode(codec.encode(x, error=e))
    for _ in range(40):
        sent += codec.decode(codec.encode(torch.zeros(4096), error=e))
    assert float((sent - x).norm() / x.norm()) < 1e-2


def test_lowrank_power_method_warm_starts():
    codec = LowRankCodec(rank=2, method="power")
    g = torch.Generator().manual_seed(0)
    m = torch.randn(50, 2, generator=g) @ torch.randn(2, 40, generator=g)
    m = m + 1e-3 * torch.randn(50, 40, generator=g)
    errs = []
    for _ in range(3):
        errs.append(float((codec.decode(codec.encode(m)) - m).norm() / m.norm()))
    assert errs[-1] < 1e-2 and errs[-1] <= errs[0] + 1e-6


@pytest.mark.parametrize("call, exc, match", [
    (lambda: TopKCodec(k=0), ValueError, "k must be >= 1"),
    (lambda: TopKCodec(bits=3), ValueError, "bits must be one of"),
    (lambda: QuantCodec(scaling="x"), ValueError, "scaling must be one of"),
    (lambda: LowRankCodec(rank="2"), TypeError, "rank must be an int"),
    (lambda: TopKCodec().encode(torch.zeros(3, dtype=torch.int64)), TypeError, "x must have dtype"),
    (lambda: TopKCodec().encode(torch.zeros(3), error=torch.zeros(4)), ValueError, "error must be"),
    (lambda: TopKCodec().decode(torch.zeros(3)), TypeError, "packed must be"),
    (lambda: TopKCodec().unpack(torch.zeros(3, dtype=torch.uint8), (5000,)), ValueError, "must have"),
    (lambda: QuantCodec().decode(QuantCodec().encode(torch.zeros(3)), out=torch.zeros(4)), ValueError, "3 elements"),
    # meta tensors: refused by name, not an internal error from deep inside (or, for the
    # low-rank decode, a meta result passed off as decoded)
    (lambda: LowRankCodec(rank=2).encode(torch.empty(8, 12, device="meta")), ValueError,
     "^x is a meta tensor"),
    (lambda: LowRankCodec(rank=2).decode(LowRankCodec(rank=2).unpack(
        torch.empty(4 * 2 * 20, dtype=torch.uint8, device="meta"), (8, 12))), ValueError,
     r"packed.data is a meta tensor"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bf16_and_fp16_inputs():
    for dtype in (torch.bfloat16, torch.float16):
        x = _x((2000,), dtype=dtype)
        for codec in (TopKCodec(k=32, chunk=512), QuantCodec(bits=8)):
            y = codec.decode(codec.encode(x))
            assert y.dtype == dtype
            assert math.isfinite(float(y.float().sum()))
    e = torch.zeros(2000)
    QuantCodec().encode(_x((2000,), dtype=torch.bfloat16), error=e)
    assert float(e.abs().max()) > 0


def test_decode_counts_where_values_land():
    x = _x((3000,), seed=6)
    topk = TopKCodec(k=8, chunk=500)
    count = torch.zeros(3000, dtype=torch.int32)
    y = topk.decode(topk.encode(x), count=count)
    assert torch.equal(count, (y != 0).int()) and int(count.sum()) == 48
    quant = QuantCodec(bits=4, block=100)
    out = torch.zeros(3000, dtype=torch.float64)  # the temporary-buffer path counts too
    quant.decode(quant.encode(x), out=out, count=count)
    assert torch.equal(count, (y != 0).int() + 1)
    with pytest.raises(ValueError, match="count must be"):
        quant.decode(quant.encode(x), count=torch.zeros(5, dtype=torch.int32))
