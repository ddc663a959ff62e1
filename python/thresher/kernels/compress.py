"""Triton kernels of the compression op family (``thresher.ops.compress``, backend "triton"):
the launchers ``topk_encode``, ``topk_decode``, ``quant_encode`` and ``quant_decode`` mirror
the C++ ones (csrc/cpu/compress.cpp) and write the same bytes. The maths is
csrc/common/compress.h's, op for op (every launch with ``enable_fp_fusion=False``); the
payload layouts are thresher.core.layouts'. Design (radix select, the pairwise tree, the
launch configurations): docs/kernels.md ("Compression", "Triton kernels")."""
from __future__ import annotations

import triton
import triton.language as tl

from thresher.core.layouts import QuantLayout, TopKLayout, index_bits

from .aot import compile_kernel, pointer_attrs, require_compiled

__all__ = ["topk_encode", "topk_decode", "quant_encode", "quant_decode", "launch_config",
           "aot_compile_stats", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("fp32", "bf16", "fp16")
CONFIGS = ((1024, 4), (4096, 8), (8192, 16))
_HALF_STEP = {2: 0.49785, 4: 0.1676, 8: 0.0154}


def launch_config(size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a chunk / block of ``size`` elements (<= 8192)."""
    for block, warps in CONFIGS:
        if size <= block:
            return block, warps
    raise ValueError(f"the Triton kernels take chunks/blocks of at most {CONFIGS[-1][0]}, got {size}")


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _quantize(v, offset, inv, BITS: tl.constexpr):
    H: tl.constexpr = 1 << (BITS - 1)
    t = tl.floor((v - offset) * inv)
    t = tl.minimum(tl.maximum(t, -H * 1.0), H - 1.0)
    return t.to(tl.int32) + H


@triton.jit
def _dequantize(q, offset, scale, BITS: tl.constexpr):
    m = 2 * q + 1 - (1 << BITS)
    return m.to(tl.float32) * scale + offset


@triton.jit
def _inv_scale(scale):
    return tl.where(scale == 0.0, 0.0, tl.math.div_rn(tl.full(scale.shape, 0.5, tl.float32), scale))


@triton.jit
def _stream_items(byte_ptr, nbytes, j, WIDTH: tl.constexpr):
    """Items j (a vector) of WIDTH bits from an LSB-first byte stream of nbytes bytes."""
    bit = j.to(tl.int64) * WIDTH
    b0 = bit >> 3
    off = bit & 7
    v = tl.zeros(j.shape, tl.int64)
    for t in tl.static_range((WIDTH + 7 + 7) // 8):
        byte = tl.load(byte_ptr + b0 + t, mask=(b0 + t) < nbytes, other=0).to(tl.int64)
        v = v | (byte << (8 * t))
    v = v >> off
    return (v & ((1 << WIDTH) - 1)).to(tl.int64)


@triton.jit
def _stream_bytes(item_ptr, count, p, WIDTH: tl.constexpr):
    """Bytes p (a vector) of the LSB-first stream of `count` WIDTH-bit items at item_ptr."""
    if WIDTH <= 8:
        PER: tl.constexpr = 8 // WIDTH
        b = tl.zeros(p.shape, tl.int32)
        for s in tl.static_range(PER):
            j = p * PER + s
            b = b | (tl.load(item_ptr + j, mask=j < count, other=0) << (s * WIDTH))
    else:
        bit = p.to(tl.int64) * 8
        j = bit // WIDTH
        off = bit - j * WIDTH
        lo = tl.load(item_ptr + j, mask=j < count, other=0).to(tl.int64) & 0xFFFFFFFF
        hi = tl.load(item_ptr + j + 1, mask=((j + 1) < count) & (off + 8 > WIDTH), other=0).to(tl.int64) & 0xFFFFFFFF
        b = ((lo >> off) | (hi << (WIDTH - off))).to(tl.int32)
    return (b & 0xFF).to(tl.uint8)


# ----------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------


@triton.jit
def _topk_encode_kernel(x_ptr, e_ptr, out_ptr, scale_ptr, codes_ptr, idx_ptr,
                        chunk, n_chunks, last_len, k_full, k_last,
                        values_off, indices_off, vb_full, ib_full,
                        BITS: tl.constexpr, IBITS: tl.constexpr, HAS_E: tl.constexpr,
                        BLOCK: tl.constexpr, NBV: tl.constexpr, NBI: tl.constexpr):
    c = tl.program_id(0)
    is_last = c == n_chunks - 1
    length = tl.where(is_last, last_len, chunk)
    kk = tl.where(is_last, k_last, k_full)
    base = c.to(tl.int64) * chunk
    i = tl.arange(0, BLOCK)
    m = i < length
    v = tl.load(x_ptr + base + i, mask=m, other=0.0).to(tl.float32)
    if HAS_E:
        v = tl.load(e_ptr + base + i, mask=m, other=0.0) + v
    key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    key = tl.where(m, key, -1)  # padding ranks below every real key (>= 0)
    absmax = tl.max(key, axis=0).to(tl.float32, bitcast=True)
    # Bitwise radix select of the kk-th largest key T (31 bits, MSB first).
    prefix = tl.zeros((), tl.int32)
    need = kk
    for b in range(30, -1, -1):  # a real loop: unrolled, 31 reductions compile for ~10 s
        bit = tl.full((), 1, tl.int32) << b
        hi = (tl.full((), 0x7FFFFFFF, tl.int32) >> (b + 1)) << (b + 1)
        ones = m & ((key & hi) == prefix) & ((key & bit) != 0)
        c1 = tl.sum(ones.to(tl.int32), axis=0)
        go = c1 >= need
        prefix = tl.where(go, prefix | bit, prefix)
        need = tl.where(go, need, need - c1)
    # chosen: key > T, or key == T among the first `need` of them (ties to the lowest index)
    eq = m & (key == prefix)
    sel = (m & (key > prefix)) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need))
    # an explicit boolean block: `block & scalar-comparison` is not a valid store mask in
    # every Triton (the 3.9 interpreter rejects its dtype)
    sel = (sel.to(tl.int32) * (kk > 0).to(tl.int32)) != 0
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    L: tl.constexpr = (1 << BITS) - 1
    scale = tl.math.div_rn(absmax, tl.full((), L * 1.0, tl.float32))
    inv = _inv_scale(scale)
    q = _quantize(v, 0.0, inv, BITS)
    if HAS_E:
        deq = _dequantize(q, 0.0, scale, BITS)
        tl.store(e_ptr + base + i, tl.where(sel, v - deq, v), mask=m)
    slot = c.to(tl.int64) * k_full + pos
    tl.store(codes_ptr + slot, q, mask=sel)
    tl.store(idx_ptr + slot, i, mask=sel)
    tl.store(scale_ptr + c, scale)
    tl.debug_barrier()  # the scratch written above is read by other threads below
    cbase = codes_ptr + c.to(tl.int64) * k_full
    ibase = idx_ptr + c.to(tl.int64) * k_full
    vb = (kk * BITS + 7) // 8
    pv = tl.arange(0, NBV)
    tl.store(out_ptr + values_off + c.to(tl.int64) * vb_full + pv, _stream_bytes(cbase, kk, pv, BITS),
             mask=pv < vb)
    ib = (kk * IBITS + 7) // 8
    pi = tl.arange(0, NBI)
    tl.store(out_ptr + indices_off + c.to(tl.int64) * ib_full + pi, _stream_bytes(ibase, kk, pi, IBITS),
             mask=pi < ib)


@triton.jit
def _topk_decode_kernel(p_ptr, scale_ptr, out_ptr, count_ptr, chunk, n_chunks, last_len, k_full,
                        k_last, values_off, indices_off, vb_full, ib_full,
                        BITS: tl.constexpr, IBITS: tl.constexpr, HAS_COUNT: tl.constexpr,
                        BK: tl.constexpr):
    c = tl.program_id(0)
    is_last = c == n_chunks - 1
    length = tl.where(is_last, last_len, chunk)
    kk = tl.where(is_last, k_last, k_full)
    j = tl.arange(0, BK)
    ok = j < kk
    scale = tl.load(scale_ptr + c)
    q = _stream_items(p_ptr + values_off + c.to(tl.int64) * vb_full, (kk * BITS + 7) // 8, j, BITS)
    idx = _stream_items(p_ptr + indices_off + c.to(tl.int64) * ib_full, (kk * IBITS + 7) // 8, j, IBITS)
    ok = ok & (idx < length)  # a corrupted index is skipped, never written out of bounds
    deq = _dequantize(q.to(tl.int32), 0.0, scale, BITS)
    dst = c.to(tl.int64) * chunk + idx
    tl.store(out_ptr + dst, tl.load(out_ptr + dst, mask=ok, other=0.0) + deq, mask=ok)
    if HAS_COUNT:
        tl.store(count_ptr + dst, tl.load(count_ptr + dst, mask=ok, other=0) + 1, mask=ok)


# ----------------------------------------------------------------------------------------
# Blockwise quantiser
# ----------------------------------------------------------------------------------------


@triton.jit
def _pairwise_sum(t, LOG2: tl.constexpr):
    """Adjacent pairs first, log2(len) times: compress.h's tree, add for add."""
    for _ in tl.static_range(LOG2):
        a, b = tl.split(tl.reshape(t, [t.shape[0] // 2, 2]))
        t = a + b
    return tl.sum(t, axis=0)  # one element left


@triton.jit
def _quant_encode_kernel(x_ptr, e_ptr, out_ptr, offset_ptr, scale_ptr, block, n_blocks, last_len,
                         codes_off, vb_full, half_step,
                         BITS: tl.constexpr, MEANSTD: tl.constexpr, HAS_E: tl.constexpr,
                         BLOCK: tl.constexpr, LOG2: tl.constexpr):
    bidx = tl.program_id(0)
    length = tl.where(bidx == n_blocks - 1, last_len, block)
    base = bidx.to(tl.int64) * block
    i = tl.arange(0, BLOCK)
    m = i < length
    v = tl.load(x_ptr + base + i, mask=m, other=0.0).to(tl.float32)
    if HAS_E:
        v = tl.load(e_ptr + base + i, mask=m, other=0.0) + v
    if MEANSTD:
        lenf = length.to(tl.float32)
        offset = tl.math.div_rn(_pairwise_sum(tl.where(m, v, 0.0), LOG2), lenf)
        d = tl.where(m, v - offset, 0.0)
        var = tl.math.div_rn(_pairwise_sum(d * d, LOG2), lenf)
        scale = tl.sqrt_rn(var) * half_step
        tl.store(offset_ptr + bidx, offset)
    else:
        offset = 0.0
        key = tl.where(m, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        L: tl.constexpr = (1 << BITS) - 1
        scale = tl.math.div_rn(tl.max(key, axis=0).to(tl.float32, bitcast=True), tl.full((), L * 1.0, tl.float32))
    tl.store(scale_ptr + bidx, scale)
    inv = _inv_scale(scale)
    q = _quantize(v, offset, inv, BITS)
    if HAS_E:
        tl.store(e_ptr + base + i, v - _dequantize(q, offset, scale, BITS), mask=m)
    PER: tl.constexpr = 8 // BITS
    q = tl.where(m, q, 0)
    shifts = tl.arange(0, PER) * BITS
    byte = tl.sum(tl.reshape(q, [BLOCK // PER, PER]) << shifts[None, :], axis=1)
    pb = tl.arange(0, BLOCK // PER)
    vb = (length * BITS + 7) // 8
    tl.store(out_ptr + codes_off + bidx.to(tl.int64) * vb_full + pb, byte.to(tl.uint8), mask=pb < vb)


@triton.jit
def _quant_decode_kernel(p_ptr, offset_ptr, scale_ptr, out_ptr, block, n_blocks, last_len,
                         codes_off, vb_full, BITS: tl.constexpr, MEANSTD: tl.constexpr,
                         BLOCK: tl.constexpr):
    bidx = tl.program_id(0)
    length = tl.where(bidx == n_blocks - 1, last_len, block)
    base = bidx.to(tl.int64) * block
    i = tl.arange(0, BLOCK)
    m = i < length
    scale = tl.load(scale_ptr + bidx)
    if MEANSTD:
        offset = tl.load(offset_ptr + bidx)
    else:
        offset = 0.0
    q = _stream_items(p_ptr + codes_off + bidx.to(tl.int64) * vb_full, (length * BITS + 7) // 8, i, BITS)
    deq = _dequantize(q.to(tl.int32), offset, scale, BITS)
    tl.store(out_ptr + base + i, tl.load(out_ptr + base + i, mask=m, other=0.0) + deq, mask=m)


# ----------------------------------------------------------------------------------------
# Launchers (inputs validated by thresher.ops.compress)
# ----------------------------------------------------------------------------------------


def topk_encode(x, error, k: int, chunk: int, bits: int, out) -> None:
    import torch

    lay = TopKLayout(x.numel(), k, chunk, bits)
    if lay.n_chunks == 0:
        return
    block, warps = launch_config(chunk)
    scratch = torch.empty(2, lay.n_chunks * lay.k_full, dtype=torch.int32, device=x.device)
    scales = out[: 4 * lay.n_chunks].view(torch.float32)
    _topk_encode_kernel[(lay.n_chunks,)](
        x, error if error is not None else scales, out, scales, scratch[0], scratch[1],
        chunk, lay.n_chunks, lay.last_len, lay.k_full, lay.k_last,
        lay.values_off, lay.indices_off, lay.vb_full, lay.ib_full,
        BITS=bits, IBITS=lay.ibits, HAS_E=error is not None, BLOCK=block,
        NBV=_pow2(lay.vb_full), NBI=_pow2(lay.ib_full), num_warps=warps, enable_fp_fusion=False)


def topk_decode(payload, n: int, k: int, chunk: int, bits: int, out, count) -> None:
    import torch

    lay = TopKLayout(n, k, chunk, bits)
    if lay.n_chunks == 0:
        return
    scales = payload[: 4 * lay.n_chunks].view(torch.float32)
    _topk_decode_kernel[(lay.n_chunks,)](
        payload, scales, out, count if count is not None else out, chunk, lay.n_chunks,
        lay.last_len, lay.k_full, lay.k_last, lay.values_off, lay.indices_off, lay.vb_full,
        lay.ib_full, BITS=bits, IBITS=lay.ibits, HAS_COUNT=count is not None,
        BK=_pow2(lay.k_full), num_warps=4, enable_fp_fusion=False)


def quant_encode(x, error, bits: int, block: int, scaling: str, out) -> None:
    import torch

    lay = QuantLayout(x.numel(), block, bits, scaling)
    if lay.n_blocks == 0:
        return
    blk, warps = launch_config(block)
    blk = max(blk, 8)
    floats = out[: lay.codes_off].view(torch.float32)
    _quant_encode_kernel[(lay.n_blocks,)](
        x, error if error is not None else floats, out, floats, floats[lay.scale_off // 4:],
        block, lay.n_blocks, lay.last_len, lay.codes_off, lay.vb_full, _HALF_STEP[bits],
        BITS=bits, MEANSTD=scaling == "meanstd", HAS_E=error is not None, BLOCK=blk,
        LOG2=(blk - 1).bit_length(), num_warps=warps, enable_fp_fusion=False)


def quant_decode(payload, n: int, block: int, bits: int, scaling: str, out) -> None:
    import torch

    lay = QuantLayout(n, block, bits, scaling)
    if lay.n_blocks == 0:
        return
    blk, warps = launch_config(block)
    floats = payload[: lay.codes_off].view(torch.float32)
    _quant_decode_kernel[(lay.n_blocks,)](
        payload, floats, floats[lay.scale_off // 4:], out, block, lay.n_blocks, lay.last_len,
        lay.codes_off, lay.vb_full, BITS=bits, MEANSTD=scaling == "meanstd", BLOCK=blk,
        num_warps=warps, enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------
# Ahead-of-time compilation (GPU readiness on machines without a GPU)
# ----------------------------------------------------------------------------------------


def _aot_specs(dtype: str):
    """(kernel name, fn, signature, constexprs, config) for the variants the tests compile:
    every dtype at the defaults (top-k 64 of 4096, 2 bits; blockwise 8 bits of 256) plus the
    largest launch configuration, and each decoder."""
    p = f"*{dtype}"
    i32 = "i32"
    enc = {"x_ptr": p, "e_ptr": "*fp32", "out_ptr": "*u8", "scale_ptr": "*fp32",
           "codes_ptr": "*i32", "idx_ptr": "*i32", "chunk": i32, "n_chunks": i32,
           "last_len": i32, "k_full": i32, "k_last": i32, "values_off": i32,
           "indices_off": i32, "vb_full": i32, "ib_full": i32, "BITS": "constexpr",
           "IBITS": "constexpr", "HAS_E": "constexpr", "BLOCK": "constexpr", "NBV": "constexpr",
           "NBI": "constexpr"}
    for block, warps in ((4096, 8), (8192, 16)):
        ib = index_bits(block)
        yield ("topk_encode", _topk_encode_kernel, enc,
               {"BITS": 2, "IBITS": ib, "HAS_E": True, "BLOCK": block, "NBV": 16, "NBI": _pow2(64 * ib // 8)},
               (block, warps))
    qenc = {"x_ptr": p, "e_ptr": "*fp32", "out_ptr": "*u8", "offset_ptr": "*fp32",
            "scale_ptr": "*fp32", "block": i32, "n_blocks": i32, "last_len": i32,
            "codes_off": i32, "vb_full": i32, "half_step": "fp32", "BITS": "constexpr",
            "MEANSTD": "constexpr", "HAS_E": "constexpr", "BLOCK": "constexpr", "LOG2": "constexpr"}
    for meanstd in (False, True):
        yield ("quant_encode_meanstd" if meanstd else "quant_encode", _quant_encode_kernel, qenc,
               {"BITS": 8, "MEANSTD": meanstd, "HAS_E": True, "BLOCK": 1024, "LOG2": 10}, (1024, 4))
    if dtype == "fp32":  # decoders read bytes and write float32 whatever x was
        dec = {"p_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*fp32", "count_ptr": "*i32",
               "chunk": i32, "n_chunks": i32, "last_len": i32, "k_full": i32, "k_last": i32,
               "values_off": i32, "indices_off": i32, "vb_full": i32, "ib_full": i32,
               "BITS": "constexpr", "IBITS": "constexpr", "HAS_COUNT": "constexpr", "BK": "constexpr"}
        yield ("topk_decode", _topk_decode_kernel, dec,
               {"BITS": 2, "IBITS": 12, "HAS_COUNT": True, "BK": 64}, (64, 4))
        qdec = {"p_ptr": "*u8", "offset_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32",
                "block": i32, "n_blocks": i32, "last_len": i32, "codes_off": i32, "vb_full": i32,
                "BITS": "constexpr", "MEANSTD": "constexpr", "BLOCK": "constexpr"}
        yield ("quant_decode", _quant_decode_kernel, qdec,
               {"BITS": 8, "MEANSTD": True, "BLOCK": 1024}, (1024, 4))


def aot_compile_stats(cc: int, full: bool = True) -> list[dict]:
    """AOT-compiles the variants of ``_aot_specs`` for ``GPUTarget("cuda", cc, 32)`` (no GPU
    needed) and returns per kernel: kernel, dtype, cc, block, num_warps, n_regs, n_spills,
    shared. ``full=False`` (the test suite's budget) compiles the float32 variants at the
    default launch configurations, without the mean/sigma encoder: the storage dtype changes
    one load, and the ten reshape+split levels of its pairwise tree take ~10 s of CPU to
    compile per architecture. Must run without TRITON_INTERPRET."""
    require_compiled(_topk_encode_kernel, "thresher.kernels.compress")
    out = []
    for dtype in SUPPORTED_DTYPES if full else ("fp32",):
        for name, fn, sig, constexprs, (block, warps) in _aot_specs(dtype):
            if not full and (block == 8192 or name == "quant_encode_meanstd"):
                continue
            k, regs, spill_st, spill_ld = compile_kernel(
                fn, sig, constexprs, pointer_attrs(fn, sig), cc,
                {"num_warps": warps, "enable_fp_fusion": False})
            out.append({"kernel": name, "dtype": dtype, "cc": int(cc), "block": block,
                        "num_warps": k.metadata.num_warps, "n_regs": regs,
                        "n_spills": spill_st + spill_ld, "shared": k.metadata.shared})
    return out
