"""Tests for thresher.ops.compress (top-k + error feedback, blockwise quantisers, packing).

Every backend must reproduce the reference bit for bit (payload bytes, the updated error
buffer, the decoded tensor); the reference itself is checked against float64 truths written
independently here (which elements are chosen, the quantisation error bound, conservation of
mass, exact round trips of on-grid values). The Triton kernels' interpreter runs are in
tests/kernels/test_compress.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from thresher.ops import BackendUnavailableError, _native
from thresher.ops import _compress_backends as B
from thresher.ops import compress as C

BACKENDS = ["reference"] + (["cpu"] if _native.cpu_ext() is not None else [])
NATIVE = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_cpu_extension_is_built():
    assert _native.cpu_ext() is not None, _native.native_status()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n, dtype=torch.float32, seed=0, scale=1.0, err=0.3):
    g = _gen(seed)
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    e = torch.randn(n, generator=g) * err * scale
    return x, e


def _run_topk(backend, x, e0, k, chunk, bits):
    e = None if e0 is None else e0.clone()
    p = C.topk_encode(x, e, k=k, chunk=chunk, bits=bits, backend=backend)
    d = C.topk_decode(p, x.numel(), k=k, chunk=chunk, bits=bits, backend=backend)
    return p, e, d


def _run_quant(backend, x, e0, bits, block, scaling):
    e = None if e0 is None else e0.clone()
    p = C.quantize_blockwise(x, e, bits=bits, block=block, scaling=scaling, backend=backend)
    d = C.dequantize_blockwise(p, x.numel(), bits=bits, block=block, scaling=scaling, backend=backend)
    return p, e, d


def _same(a, b):
    for u, v in zip(a, b):
        if u is None:
            assert v is None
            continue
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u, v), f"max diff {(u.double() - v.double()).abs().max()}"


TOPK_CASES = [
    # n, k, chunk, bits
    (10000, 64, 4096, 2),
    (4096 * 3, 64, 4096, 2),
    (5000, 7, 100, 4),
    (37, 64, 4096, 8),      # one short chunk, fewer elements than k
    (1, 64, 4096, 2),
    (1000, 1000, 1000, 2),  # k = chunk: everything sent
    (130000, 300, 70000, 4),  # 32-bit indices
    (9000, 33, 5000, 8),    # 16-bit indices, odd k
    (10, 3, 3, 8),          # tiny chunks, 12-bit records of 4.5 bytes
]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("case", TOPK_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_backend_matches_reference_exactly(backend, case, dtype):
    n, k, chunk, bits = case
    x, e = _inputs(n, dtype, seed=n + k)
    _same(_run_topk("reference", x, e, k, chunk, bits), _run_topk(backend, x, e, k, chunk, bits))
    _same(_run_topk("reference", x, None, k, chunk, bits), _run_topk(backend, x, None, k, chunk, bits))


@pytest.mark.parametrize("backend", NATIVE)
def test_topk_ties_go_to_the_lowest_index(backend):
    # integers: many equal |e| values, so the k-th largest is tied inside every chunk
    g = _gen(3)
    x = torch.randint(-3, 4, (20000,), generator=g).float()
    for k, chunk in ((64, 4096), (5, 16), (100, 1000)):
        ref = _run_topk("reference", x, torch.zeros_like(x), k, chunk, 2)
        got = _run_topk(backend, x, torch.zeros_like(x), k, chunk, 2)
        _same(ref, got)
        sent = ref[2] != 0
        for c in range(0, x.numel(), chunk):
            v = x[c:c + chunk].abs()
            s = sent[c:c + chunk]
            kth = v.sort(descending=True).values[min(k, v.numel()) - 1]
            # everything above the tie value is sent; tied ones: a prefix in index order
            assert bool(s[v > kth].all())
            tied = (v == kth).nonzero().flatten()
            st = s[tied]
            assert bool((st[:-1].int() >= st[1:].int()).all()), "tied indices not a prefix"
            assert int(s.sum()) == min(k, v.numel()) or kth == 0


def _truth_topk(x, e, k, chunk, bits):
    """Independent float64 model: chosen set (|v| desc, index asc), scale, |deq - v| bound."""
    v = (e.double() + x.double()).float().double()  # e + x rounded to fp32, as every backend
    chosen = torch.zeros(v.numel(), dtype=torch.bool)
    scales = []
    for c in range(0, v.numel(), chunk):
        seg = v[c:c + chunk]
        order = sorted(range(seg.numel()), key=lambda i: (-abs(float(seg[i])), i))
        for i in order[:min(k, seg.numel())]:
            chosen[c + i] = True
        scales.append(float(seg.abs().max()) / ((1 << bits) - 1))
    return v, chosen, scales


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_topk_matches_float64_truth(backend, bits):
    n, k, chunk = 3000, 50, 700
    x, e0 = _inputs(n, seed=bits)
    p, e, d = _run_topk(backend, x, e0, k, chunk, bits)
    v, chosen, scales = _truth_topk(x, e0, k, chunk, bits)
    got_chosen = d != 0
    assert torch.equal(got_chosen, chosen)
    for ci, c in enumerate(range(0, n, chunk)):
        s = scales[ci]
        seg = slice(c, c + chunk)
        err = (d[seg].double() - v[seg]).abs()[chosen[seg]]
        # nearest of the levels (2q+1-L) s, which span [-max|v|, max|v|]: error <= s
        assert float(err.max()) <= s * (1 + 1e-5)
        stored = float(p[4 * ci: 4 * ci + 4].view(torch.float32))
        assert math.isclose(stored, s, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_error_feedback_conserves_mass(backend, dtype):
    n = 20000
    x, e0 = _inputs(n, dtype, seed=7)
    _, e, d = _run_topk(backend, x, e0, 64, 4096, 2)
    t = (e0 + x.float())  # fp32 e + x, as the kernels compute it
    sent = d != 0
    assert torch.equal(e[~sent], t[~sent])  # untouched exactly
    # sent: e_new = fl(t - deq): within half an ulp of |e_new|
    gap = (e[sent].double() + d[sent].double() - t[sent].double()).abs()
    assert bool((gap <= e[sent].double().abs() * 2.0**-24 + 1e-45).all())


def _on_grid(n_chunks, chunk, bits, seed=0):
    """Values (2q + 1 - L) s with s a power of two and both extreme codes in every chunk:
    the quantiser must reproduce them exactly."""
    g = _gen(seed)
    L = 1 << bits
    q = torch.randint(0, L, (n_chunks, chunk), generator=g)
    q[:, 0], q[:, -1] = 0, L - 1
    s = 2.0 ** torch.randint(-10, 10, (n_chunks, 1), generator=g).float()
    return ((2 * q + 1 - L).float() * s).reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_lossless_on_grid_full_k(backend, bits):
    chunk = 256
    x = _on_grid(5, chunk, bits)
    e = torch.zeros_like(x)
    p = C.topk_encode(x, e, k=chunk, chunk=chunk, bits=bits, backend=backend)
    d = C.topk_decode(p, x.numel(), k=chunk, chunk=chunk, bits=bits, backend=backend)
    assert torch.equal(d, x)
    assert torch.equal(e, torch.zeros_like(x))
    for scaling in ("absmax",):
        e = torch.zeros_like(x)
        p = C.quantize_blockwise(x, e, bits=bits, block=chunk, scaling=scaling, backend=backend)
        d = C.dequantize_blockwise(p, x.numel(), bits=bits, block=chunk, scaling=scaling, backend=backend)
        assert torch.equal(d, x)
        assert torch.equal(e, torch.zeros_like(x))


def _formula_topk(n, k, chunk, bits):
    w = 12 if chunk <= 4096 else (16 if chunk <= 65536 else 32)
    total = 0
    for c in range(0, n, chunk):
        kc = min(k, min(chunk, n - c))
        total += 4 + math.ceil(kc * bits / 8) + math.ceil(kc * w / 8)
    return total


@pytest.mark.parametrize("backend", BACKENDS)
def test_byte_counts_equal_the_formula(backend):
    for n, k, chunk, bits in TOPK_CASES + [(0, 64, 4096, 2), (4097, 64, 4096, 2), (100, 3, 1, 4)]:
        x = torch.randn(n)
        p = C.topk_encode(x, k=k, chunk=chunk, bits=bits, backend=backend)
        assert p.numel() == C.topk_nbytes(n, k, chunk, bits) == _formula_topk(n, k, chunk, bits)
    for n, bits, block, scaling in [(1000, 8, 256, "absmax"), (1001, 2, 256, "meanstd"),
                                    (7, 4, 3, "absmax"), (0, 8, 256, "meanstd")]:
        x = torch.randn(n)
        p = C.quantize_blockwise(x, bits=bits, block=block, scaling=scaling, backend=backend)
        nb = math.ceil(n / block)
        want = 4 * nb * (2 if scaling == "meanstd" else 1) + sum(
            math.ceil(min(block, n - b) * bits / 8) for b in range(0, n, block))
        assert p.numel() == C.quant_nbytes(n, bits, block, scaling) == want
    # the headline setting: 116 bytes per 4096-chunk
    assert C.topk_nbytes(64 * 2**20) == 116 * 16384


def test_index_packing_round_trips_every_chunk_size():
    g = _gen(11)
    for chunk in list(range(1, 4097)) + [4097, 5000, 65535, 65536, 65537, 2**20, 2**31 - 1]:
        m = 1 + (chunk * 7919) % 9  # 1..9 items, odd and even counts
        idx = torch.randint(0, chunk, (2, m), generator=g)
        idx[0, -1] = chunk - 1  # the largest index of the chunk
        packed = C.pack_indices(idx, chunk)
        assert packed.shape == (2, math.ceil(m * C.index_bits(chunk) / 8))
        assert torch.equal(C.unpack_indices(packed, chunk, m), idx)
    for bits in (1, 2, 4, 8, 12, 16, 32):
        codes = torch.randint(0, 2**bits, (3, 13), generator=g)
        assert torch.equal(C.unpack_bits(C.pack_bits(codes, bits), bits, 13), codes)


@pytest.mark.parametrize("backend", NATIVE)
def test_native_index_records_every_chunk_size(backend):
    # every index of every chunk size class goes through the kernel's packer (k = chunk)
    for chunk in (1, 2, 3, 5, 8, 13, 100, 1023, 4095, 4096, 4097, 65536, 65537):
        n = chunk * 2 + (chunk // 3)
        k = chunk if chunk <= 4097 else 777  # all indices; past 12 bits, the top ones
        x = torch.arange(1, n + 1, dtype=torch.float32)
        ref = _run_topk("reference", x, None, k, chunk, 8)
        _same(ref, _run_topk(backend, x, None, k, chunk, 8))
        assert int((ref[2] != 0).sum()) == (n if k == chunk else 2 * k + min(k, chunk // 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_shapes_and_empty(backend):
    for shape in [(0,), (1,), (3, 5), (7, 11, 13), (0, 4)]:
        x = torch.randn(shape)
        e = torch.zeros(shape)
        p = C.topk_encode(x, e, k=4, chunk=16, bits=4, backend=backend)
        d = C.topk_decode(p, x.numel(), k=4, chunk=16, bits=4, backend=backend)
        assert d.shape == (x.numel(),)
        assert torch.allclose(d + e.reshape(-1), x.reshape(-1), atol=1e-6)
    # non-contiguous x
    base = torch.randn(64, 50)
    xt = base.t()
    a = _run_topk(backend, xt, None, 8, 128, 2)
    b = _run_topk(backend, xt.contiguous(), None, 8, 128, 2)
    _same(a, b)


QUANT_CASES = [(n, bits, block, sc) for n, block in ((10000, 256), (999, 100), (5, 256), (4097, 4096), (33, 1))
               for bits in (2, 4, 8) for sc in ("absmax", "meanstd")]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("case", QUANT_CASES, ids=str)
def test_quant_backend_matches_reference_exactly(backend, case):
    n, bits, block, sc = case
    for dtype in DTYPES:
        x, e = _inputs(n, dtype, seed=n * bits)
        _same(_run_quant("reference", x, e, bits, block, sc), _run_quant(backend, x, e, bits, block, sc))
    x, e = _inputs(n, seed=1)
    _same(_run_quant("reference", x, None, bits, block, sc), _run_quant(backend, x, None, bits, block, sc))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_quant_matches_float64_truth(backend, bits):
    n, block = 5000, 256
    x, _ = _inputs(n, seed=bits + 100)
    L = 1 << bits
    # absmax: every element within one scale (half a step) of its value
    d = _run_quant(backend, x, None, bits, block, "absmax")[2].double()
    xs = x.double()
    for b in range(0, n, block):
        seg = xs[b:b + block]
        s = float(seg.abs().max()) / (L - 1)
        assert float((d[b:b + block] - seg).abs().max()) <= s * (1 + 1e-5)
    # meanstd: elements inside the quantiser's range are within half a step of their value
    p, _, d = _run_quant(backend, x, None, bits, block, "meanstd")
    nb = math.ceil(n / block)
    offs = p[:4 * nb].view(torch.float32).double()
    scales = p[4 * nb: 8 * nb].view(torch.float32).double()
    for j, b in enumerate(range(0, n, block)):
        seg = xs[b:b + block]
        mu, sd = float(seg.mean()), float(seg.std(unbiased=False))
        assert math.isclose(float(offs[j]), mu, rel_tol=1e-4, abs_tol=1e-6)
        half = {2: 0.49785, 4: 0.1676, 8: 0.0154}[bits]
        assert math.isclose(float(scales[j]), sd * half, rel_tol=1e-5)
        inside = (seg - mu).abs() <= (L - 1) * float(scales[j])
        err = (d.double()[b:b + block] - seg).abs()[inside]
        assert float(err.max()) <= float(scales[j]) * (1 + 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", ("absmax", "meanstd"))
def test_quant_error_feedback_conserves_mass(backend, scaling):
    x, e0 = _inputs(3000, seed=5)
    _, e, d = _run_quant(backend, x, e0, 2, 256, scaling)
    t = e0 + x
    gap = (e.double() + d.double() - t.double()).abs()
    assert bool((gap <= e.double().abs() * 2.0**-24 + 1e-45).all())


def test_decode_accumulates_into_out_and_counts():
    x, _ = _inputs(5000, seed=9)
    p = C.topk_encode(x, k=16, chunk=512)
    d = C.topk_decode(p, 5000, k=16, chunk=512)
    out = torch.ones(5000)
    count = torch.zeros(5000, dtype=torch.int32)
    C.topk_decode(p, 5000, k=16, chunk=512, out=out, count=count)
    C.topk_decode(p, 5000, k=16, chunk=512, out=out, count=count)
    assert torch.equal(out, 1 + d + d)
    assert torch.equal(count, 2 * (d != 0).int())


def test_constant_and_zero_chunks():
    for backend in BACKENDS:
        for val in (0.0, 2.5):
            x = torch.full((300,), val)
            e = torch.zeros(300)
            p = C.topk_encode(x, e, k=10, chunk=100, bits=2, backend=backend)
            d = C.topk_decode(p, 300, k=10, chunk=100, bits=2, backend=backend)
            # ties everywhere: the first 10 of each chunk, sent exactly (top level = max)
            want = torch.zeros(300)
            for c in range(0, 300, 100):
                want[c:c + 10] = val
            assert torch.equal(d, want)
            for sc in ("absmax", "meanstd"):
                q = C.quantize_blockwise(x, bits=4, block=64, scaling=sc, backend=backend)
                assert torch.equal(C.dequantize_blockwise(q, 300, bits=4, block=64, scaling=sc,
                                                          backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_raises(backend):
    x = torch.randn(1000)
    x[517] = float("nan")
    with pytest.raises(ValueError, match="finite.*chunk 1"):
        C.topk_encode(x, k=8, chunk=512, backend=backend)
    x[517] = float("inf")
    with pytest.raises(ValueError, match="finite.*block 2"):
        C.quantize_blockwise(x, block=256, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_payload_raises(backend):
    x = torch.randn(100)
    p = C.topk_encode(x, k=4, chunk=64, bits=2, backend=backend)
    lay = C.topk_layout(100, 4, 64, 2)
    bad = p.clone()
    bad[lay.indices_off + lay.ib_full:] = 255  # last chunk (36 long): index 4095
    with pytest.raises(ValueError, match="outside their chunk"):
        C.topk_decode(bad, 100, k=4, chunk=64, bits=2, backend=backend)


def _with_header_float(payload, index, value):
    bad = payload.clone()
    bad[4 * index: 4 * index + 4] = torch.tensor([value], dtype=torch.float32).view(torch.uint8)
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
def test_non_finite_scale_in_payload_raises_and_leaves_out_alone(backend, value):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = torch.ones(1000)
    p = C.topk_encode(x, k=8, chunk=256, backend=backend)
    with pytest.raises(ValueError, match=f"payload must hold finite scales.*chunk 2's is {value}"):
        C.topk_decode(_with_header_float(p, 2, value), 1000, k=8, chunk=256, out=out,
                      backend=backend)
    p = C.quantize_blockwise(x, bits=4, block=128, backend=backend)
    with pytest.raises(ValueError, match="payload must hold finite scales.*block 5"):
        C.dequantize_blockwise(_with_header_float(p, 5, value), 1000, bits=4, block=128,
                               out=out, backend=backend)
    # meanstd: offsets (blocks 0..7) come before the scales (8..15)
    p = C.quantize_blockwise(x, bits=4, block=128, scaling="meanstd", backend=backend)
    for i in (3, 8 + 6):
        with pytest.raises(ValueError, match=f"block {i % 8}"):
            C.dequantize_blockwise(_with_header_float(p, i, value), 1000, bits=4, block=128,
                                   scaling="meanstd", out=out, backend=backend)
    assert torch.equal(out, torch.ones(1000))


def _meta(n, dtype=torch.float32):
    return torch.empty(n, dtype=dtype, device="meta")


@pytest.mark.parametrize("call, exc, match", [
    (lambda: C.topk_encode(_meta(10)), ValueError, "x is a meta tensor"),
    (lambda: C.quantize_blockwise(_meta(10)), ValueError, "x is a meta tensor"),
    (lambda: C.topk_decode(_meta(C.topk_nbytes(10), torch.uint8), 10), ValueError,
     "payload is a meta tensor"),
    (lambda: C.dequantize_blockwise(_meta(C.quant_nbytes(10), torch.uint8), 10), ValueError,
     "payload is a meta tensor"),
    (lambda: C.topk_encode(torch.arange(10)), TypeError, "x must have dtype"),
    (lambda: C.topk_encode([1.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: C.topk_encode(torch.randn(10), torch.zeros(10, dtype=torch.float16)), TypeError, "error must have dtype"),
    (lambda: C.topk_encode(torch.randn(10), torch.zeros(9)), ValueError, "error must have as many"),
    (lambda: C.topk_encode(torch.randn(4, 4), torch.zeros(4, 4).t()), ValueError, "contiguous"),
    (lambda: C.topk_encode(torch.randn(10), k=0), ValueError, "k must be in"),
    (lambda: C.topk_encode(torch.randn(10), chunk=0), ValueError, "chunk must be in"),
    (lambda: C.topk_encode(torch.randn(10), bits=3), ValueError, "bits must be one of"),
    (lambda: C.topk_encode(torch.randn(10), bits=2.0), TypeError, "bits must be an int"),
    (lambda: C.topk_encode(torch.randn(10), backend="fast"), ValueError, "backend must be one of"),
    (lambda: C.topk_encode(torch.randn(10), backend="cuda"), BackendUnavailableError, "cuda"),
    (lambda: C.topk_decode(torch.zeros(5, dtype=torch.uint8), 10), ValueError, "exactly"),
    (lambda: C.topk_decode(torch.zeros(5), 10), TypeError, "payload must have dtype"),
    (lambda: C.topk_decode(C.topk_encode(torch.randn(10)), 10, out=torch.zeros(10, dtype=torch.float64)),
     TypeError, "out must have dtype"),
    (lambda: C.topk_decode(C.topk_encode(torch.randn(10)), 10, out=torch.zeros(11)), ValueError, "out must have 10"),
    (lambda: C.quantize_blockwise(torch.randn(10), scaling="minmax"), ValueError, "scaling must be one of"),
    (lambda: C.quantize_blockwise(torch.randn(10), block=-1), ValueError, "block must be in"),
    (lambda: C.dequantize_blockwise(torch.zeros(3, dtype=torch.uint8), 10), ValueError, "exactly"),
])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_error_lists_every_reason():
    with pytest.raises(BackendUnavailableError) as info:
        C.topk_encode(torch.randn(10), chunk=10000, backend="cuda")
    msg = str(info.value)
    assert "runs on cuda" in msg and "chunk 10000" in msg


# ---------------------------------------------------------------------------------------
# Custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, e = _inputs(700, seed=1)
    p = C.topk_encode(x, k=8, chunk=256, bits=4, backend=backend)
    q = C.quantize_blockwise(x, bits=4, block=64, scaling="meanstd", backend=backend)
    cases = [
        (B.topk_encode_op, (x, e.clone(), 8, 256, 4, backend)),
        (B.topk_encode_op, (x, None, 8, 256, 4, backend)),
        (B.topk_decode_op, (p, torch.zeros(700), torch.zeros(700, dtype=torch.int32), 8, 256, 4, backend)),
        (B.quant_encode_op, (x, e.clone(), 4, 64, "meanstd", backend)),
        (B.quant_decode_op, (q, torch.zeros(700), 4, 64, "meanstd", backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_decode():
    x, _ = _inputs(5000, seed=2)
    p = C.topk_encode(x, k=16, chunk=1024, bits=4)

    def f(payload, base):
        return C.topk_decode(payload, 5000, k=16, chunk=1024, bits=4) * 2 + base

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    base = torch.randn(5000)
    assert torch.equal(compiled(p, base), f(p, base))
