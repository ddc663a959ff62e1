"""Compressed-communication ops: top-k per chunk with fused error feedback, blockwise 8/4/2-bit
quantisers, value and index bit-packing, and the decoders (decode-and-accumulate).

Public API: ``topk_encode``, ``topk_decode``, ``quantize_blockwise``, ``dequantize_blockwise``,
``topk_nbytes``, ``quant_nbytes`` (also exported from ``thresher.ops``); from this module also
``index_bits``, ``pack_bits`` / ``unpack_bits``, ``pack_indices`` / ``unpack_indices`` and the
payload layouts (``TopKLayout``, ``QuantLayout``: thresher.core.layouts). Every backend
produces the same bytes and the same error buffer, bit for bit. The maths, the payload formats
and the non-finite-input rules: docs/kernels.md ("Compression"); signatures:
docs/interfaces.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native
from ._dispatch import (
    BackendSpec,
    Dispatcher,
    extension_available,
    on_device,
    triton_available,
    triton_module,
)
from thresher.core.checks import check_choice, check_has_data, check_tensor, values_checkable
from thresher.core.layouts import QuantLayout, TopKLayout, index_bits, packed_nbytes, topk_layout

__all__ = [
    "topk_encode",
    "topk_decode",
    "quantize_blockwise",
    "dequantize_blockwise",
    "topk_nbytes",
    "quant_nbytes",
    "index_bits",
    "pack_bits",
    "unpack_bits",
    "pack_indices",
    "unpack_indices",
    "TopKLayout",
    "QuantLayout",
    "topk_layout",
    "reference_topk_encode",
    "reference_topk_decode",
    "reference_quant_encode",
    "reference_quant_decode",
]

X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS = (2, 4, 8)
SCALINGS = ("absmax", "meanstd")
MAX_CHUNK = 2**31 - 1
# c_b / 2 of csrc/common/compress.h (meanstd_half_step), as float32.
_MEANSTD_HALF_STEP = {2: 0.49785, 4: 0.1676, 8: 0.0154}


# ----------------------------------------------------------------------------------------
# Byte counts (the exact formulas; the layouts are thresher.core.layouts')
# ----------------------------------------------------------------------------------------


def topk_nbytes(numel: int, k: int = 64, chunk: int = 4096, bits: int = 2) -> int:
    """Exact payload bytes: ``4 n_chunks + sum_c ceil(k_c bits/8) + ceil(k_c w/8)``."""
    return TopKLayout(numel, k, chunk, bits).total


def quant_nbytes(numel: int, bits: int = 8, block: int = 256, scaling: str = "absmax") -> int:
    """Exact payload bytes: ``4 n_blocks (x2 for meanstd) + sum_b ceil(len_b bits / 8)``."""
    return QuantLayout(numel, block, bits, scaling).total


# ----------------------------------------------------------------------------------------
# Bit packing (pure PyTorch; the reference's building blocks, also public)
# ----------------------------------------------------------------------------------------


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Packs the last dim of ``codes`` (integers < 2^bits, bits in 1..32) LSB-first into
    ``ceil(m bits / 8)`` uint8 per row (rows are packed independently)."""
    lead, m = tuple(codes.shape[:-1]), codes.size(-1)
    nbytes = packed_nbytes(m, bits)
    c = codes.reshape(-1, m).to(torch.int64)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        mp = m + (-m) % per
        c = torch.nn.functional.pad(c, (0, mp - m)).view(c.size(0), mp // per, per)
        shifts = torch.arange(per, device=c.device) * bits
        out = (c << shifts).sum(-1)
    else:  # through a bit matrix: general widths (12, 16, 32) for indices
        shifts = torch.arange(bits, device=c.device)
        bitm = ((c.unsqueeze(-1) >> shifts) & 1).view(c.size(0), m * bits)
        bitm = torch.nn.functional.pad(bitm, (0, (-(m * bits)) % 8)).view(c.size(0), nbytes, 8)
        out = (bitm << torch.arange(8, device=c.device)).sum(-1)
    return out[:, :nbytes].to(torch.uint8).reshape(*lead, nbytes)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``count`` items per row, int64."""
    lead, nb = tuple(packed.shape[:-1]), packed.size(-1)
    p = packed.reshape(-1, nb).to(torch.int64)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        shifts = torch.arange(per, device=p.device) * bits
        out = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(p.size(0), nb * per)
    else:
        bitm = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).view(p.size(0), nb * 8)
        usable = (nb * 8) // bits
        bitm = bitm[:, : usable * bits].view(p.size(0), usable, bits)
        out = (bitm << torch.arange(bits, device=p.device)).sum(-1)
    return out[:, :count].reshape(*lead, count)


def pack_indices(idx: Tensor, chunk: int) -> Tensor:
    """Packs in-chunk indices (< chunk) with ``index_bits(chunk)`` bits each."""
    return pack_bits(idx, index_bits(chunk))


def unpack_indices(packed: Tensor, chunk: int, count: int) -> Tensor:
    return unpack_bits(packed, index_bits(chunk), count)


# ----------------------------------------------------------------------------------------
# Reference backend (plain PyTorch: torch.topk + arithmetic + bit ops)
# ----------------------------------------------------------------------------------------


def _f32_from_bytes(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def _quantize(v, offset, inv, bits):
    h = 1 << (bits - 1)
    t = torch.floor((v - offset) * inv)
    t = torch.where(torch.isnan(t), torch.full_like(t, -h), t).clamp_(-h, h - 1)
    return t.to(torch.int64) + h


def _dequantize(q, offset, scale, bits):
    return (2 * q + 1 - (1 << bits)).to(torch.float32) * scale + offset


def _div(a, b):
    """Correctly rounded float32 a / b: computed in float64 and rounded once (innocuous double
    rounding: 53 >= 2*24 + 2 bits). torch's float32 CPU kernels are not all correctly rounded
    (its float32 sqrt is not), and the backends must agree bit for bit."""
    return (a.double() / b).to(torch.float32)


def _inv_scale(scale):
    return torch.where(scale == 0, torch.zeros_like(scale), _div(torch.full_like(scale, 0.5), scale))


def _chunk_records(flat_full: Tensor, flat_last: Tensor | None) -> Tensor:
    parts = [flat_full.reshape(-1)] + ([flat_last.reshape(-1)] if flat_last is not None else [])
    return torch.cat(parts)


def reference_topk_encode(x: Tensor, error: Tensor | None, k: int, chunk: int, bits: int) -> Tensor:
    lay = TopKLayout(x.numel(), k, chunk, bits)
    n, nc, dev = lay.n, lay.n_chunks, x.device
    if nc == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev)
    xf = x.reshape(-1).to(torch.float32)
    if error is not None:
        v = error.view(-1).add_(xf)  # e += x (in place); v aliases e
    else:
        v = xf
    vp = torch.zeros(nc * chunk, dtype=torch.float32, device=dev)
    vp[:n] = v
    keys = (vp.view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    pos = torch.arange(chunk, device=dev, dtype=torch.int64)
    # (|e| bits, lowest index first) as one unique int64: torch.topk then needs no tie rule
    comp = ((keys.view(nc, chunk) << 32) | (0xFFFFFFFF - pos))
    if lay.last_len < chunk:
        comp[-1, lay.last_len:] = -1
    kf = lay.k_full
    idx = torch.topk(comp, kf, dim=1, sorted=False).indices.sort(dim=1).values
    vals = vp.view(nc, chunk).gather(1, idx)
    mx = keys.view(nc, chunk).amax(1).to(torch.int32).view(torch.float32)
    L = 1 << bits
    scale = _div(mx, L - 1)
    inv = _inv_scale(scale)
    q = _quantize(vals, 0.0, inv[:, None], bits)
    deq = _dequantize(q, 0.0, scale[:, None], bits)
    gidx = idx + (torch.arange(nc, device=dev) * chunk)[:, None]
    valid = idx < torch.where(torch.arange(nc, device=dev) == nc - 1, lay.last_len, chunk)[:, None]
    if error is not None:
        error.view(-1)[gidx[valid]] = vals[valid] - deq[valid]
    klast = lay.k_last
    codes_full, codes_last = q[:-1], q[-1, :klast]
    idx_full, idx_last = idx[:-1], idx[-1, :klast]
    return torch.cat([
        scale.view(torch.uint8),
        _chunk_records(pack_bits(codes_full, bits), pack_bits(codes_last[None], bits)),
        _chunk_records(pack_indices(idx_full, chunk), pack_indices(idx_last[None], chunk)),
    ])


def _parse_topk(payload: Tensor, lay: TopKLayout):
    """(scale (nc,), codes (nc, k_full), idx (nc, k_full), valid mask) from a payload."""
    nc, kf, kl = lay.n_chunks, lay.k_full, lay.k_last
    scale = _f32_from_bytes(payload[: 4 * nc])
    vo, io = lay.values_off, lay.indices_off
    nfull = nc - 1
    vfull = payload[vo: vo + nfull * lay.vb_full].view(nfull, lay.vb_full)
    vlast = payload[vo + nfull * lay.vb_full: io]
    ifull = payload[io: io + nfull * lay.ib_full].view(nfull, lay.ib_full)
    ilast = payload[io + nfull * lay.ib_full: lay.total]
    codes = torch.zeros(nc, kf, dtype=torch.int64, device=payload.device)
    idx = torch.zeros(nc, kf, dtype=torch.int64, device=payload.device)
    codes[:nfull] = unpack_bits(vfull, lay.bits, kf)
    idx[:nfull] = unpack_indices(ifull, lay.chunk, kf)
    codes[-1, :kl] = unpack_bits(vlast[None], lay.bits, kl)[0]
    idx[-1, :kl] = unpack_indices(ilast[None], lay.chunk, kl)[0]
    slot = torch.arange(kf, device=payload.device)
    is_last = torch.arange(nc, device=payload.device) == nc - 1
    present = torch.where(is_last[:, None], slot[None] < kl, torch.ones_like(slot[None], dtype=torch.bool))
    length = torch.where(is_last, lay.last_len, lay.chunk)
    return scale, codes, idx, present, length


def reference_topk_decode(payload: Tensor, lay: TopKLayout, out: Tensor, count: Tensor | None) -> int:
    if lay.n_chunks == 0:
        return 0
    scale, codes, idx, present, length = _parse_topk(payload, lay)
    ok = present & (idx < length[:, None])
    bad = int((present & ~ok).sum())
    deq = _dequantize(codes, 0.0, scale[:, None], lay.bits)
    gidx = (idx + (torch.arange(lay.n_chunks, device=out.device) * lay.chunk)[:, None])[ok]
    flat = out.view(-1)
    flat[gidx] = flat[gidx] + deq[ok]  # indices are distinct within a payload
    if count is not None:
        count.view(-1)[gidx] += 1
    return bad


def _pairwise_sum(t: Tensor) -> Tensor:
    """Row sums of (R, 2^m) by the adjacent-pairs tree of csrc/common/compress.h."""
    while t.size(1) > 1:
        t = t[:, 0::2] + t[:, 1::2]
    return t[:, 0]


def _quant_stats(vp: Tensor, lay: QuantLayout, dev):
    nb, B, bits = lay.n_blocks, lay.block, lay.bits
    lens = torch.full((nb,), B, dtype=torch.float32, device=dev)
    lens[-1] = lay.last_len
    if lay.scaling == "absmax":
        mx = ((vp.view(torch.int32) & 0x7FFFFFFF).amax(1)).view(torch.float32)
        return torch.zeros_like(mx), _div(mx, (1 << bits) - 1)
    np2 = 1 << max(0, (B - 1).bit_length())
    valid = torch.arange(B, device=dev)[None] < lens[:, None]
    tree = torch.nn.functional.pad(vp, (0, np2 - B))
    offset = _div(_pairwise_sum(tree), lens)
    d = torch.where(valid, vp - offset[:, None], torch.zeros_like(vp))
    var = _div(_pairwise_sum(torch.nn.functional.pad(d * d, (0, np2 - B))), lens)
    half = torch.tensor(_MEANSTD_HALF_STEP[bits], dtype=torch.float32, device=dev)
    return offset, var.double().sqrt().to(torch.float32) * half  # correctly rounded sqrt


def reference_quant_encode(x: Tensor, error: Tensor | None, bits: int, block: int, scaling: str) -> Tensor:
    lay = QuantLayout(x.numel(), block, bits, scaling)
    n, nb, dev = lay.n, lay.n_blocks, x.device
    if nb == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev)
    xf = x.reshape(-1).to(torch.float32)
    v = error.view(-1).add_(xf) if error is not None else xf
    vp = torch.zeros(nb * block, dtype=torch.float32, device=dev)
    vp[:n] = v
    vp = vp.view(nb, block)
    offset, scale = _quant_stats(vp, lay, dev)
    inv = _inv_scale(scale)
    q = _quantize(vp, offset[:, None], inv[:, None], bits)
    if error is not None:
        deq = _dequantize(q, offset[:, None], scale[:, None], bits)
        error.view(-1).copy_((vp - deq).view(-1)[:n])
    parts = ([offset.view(torch.uint8)] if scaling == "meanstd" else []) + [scale.view(torch.uint8)]
    parts.append(_chunk_records(pack_bits(q[:-1], bits), pack_bits(q[-1:, : lay.last_len], bits)))
    return torch.cat(parts)


def reference_quant_decode(payload: Tensor, lay: QuantLayout, out: Tensor) -> None:
    nb, B, bits = lay.n_blocks, lay.block, lay.bits
    if nb == 0:
        return
    scale = _f32_from_bytes(payload[lay.scale_off: lay.scale_off + 4 * nb])
    offset = _f32_from_bytes(payload[:4 * nb]) if lay.scaling == "meanstd" else torch.zeros_like(scale)
    co = lay.codes_off
    codes = torch.zeros(nb, B, dtype=torch.int64, device=payload.device)
    codes[:-1] = unpack_bits(payload[co: co + (nb - 1) * lay.vb_full].view(nb - 1, lay.vb_full), bits, B)
    codes[-1, : lay.last_len] = unpack_bits(payload[co + (nb - 1) * lay.vb_full: lay.total][None],
                                            bits, lay.last_len)[0]
    deq = _dequantize(codes, offset[:, None], scale[:, None], bits).view(-1)[: lay.n]
    flat = out.view(-1)
    flat.copy_(flat + deq)


# ----------------------------------------------------------------------------------------
# Native backends
# ----------------------------------------------------------------------------------------

_SCALING_CODE = {"absmax": 0, "meanstd": 1}


def _cpu_topk_encode(x, error, k, chunk, bits, out):
    _native.cpu_ext().topk_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                  x.numel(), k, chunk, bits, out.data_ptr(), _native.num_threads())


def _cpu_topk_decode(payload, lay, out, count):
    return _native.cpu_ext().topk_decode(payload.data_ptr(), lay.n, lay.k, lay.chunk, lay.bits,
                                         out.data_ptr(), _native.ptr(count), _native.num_threads())


def _cpu_quant_encode(x, error, bits, block, scaling, out):
    _native.cpu_ext().quant_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                   x.numel(), block, bits, _SCALING_CODE[scaling], out.data_ptr(),
                                   _native.num_threads())


def _cpu_quant_decode(payload, lay, out):
    _native.cpu_ext().quant_decode(payload.data_ptr(), lay.n, lay.block, lay.bits,
                                   _SCALING_CODE[lay.scaling], out.data_ptr(), _native.num_threads())


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _cuda_topk_encode(x, error, k, chunk, bits, out):
    with on_device(x):  # the launchers use the current device's stream
        _native.cuda_ext().topk_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                       x.numel(), k, chunk, bits, out.data_ptr(), _stream(x))


def _cuda_topk_decode(payload, lay, out, count):
    with on_device(out):
        _native.cuda_ext().topk_decode(payload.data_ptr(), lay.n, lay.k, lay.chunk, lay.bits,
                                       out.data_ptr(), _native.ptr(count), _stream(out))
    return 0  # out-of-chunk indices are skipped on the GPU, not counted (no host sync)


def _cuda_quant_encode(x, error, bits, block, scaling, out):
    with on_device(x):
        _native.cuda_ext().quant_encode(x.data_ptr(), _native.DTYPE_CODES[x.dtype], _native.ptr(error),
                                        x.numel(), block, bits, _SCALING_CODE[scaling],
                                        out.data_ptr(), _stream(x))


def _cuda_quant_decode(payload, lay, out):
    with on_device(out):
        _native.cuda_ext().quant_decode(payload.data_ptr(), lay.n, lay.block, lay.bits,
                                        _SCALING_CODE[lay.scaling], out.data_ptr(), _stream(out))


def _triton_module():
    return triton_module("compress")


def _triton_topk_encode(x, error, k, chunk, bits, out):
    with on_device(x):
        _triton_module().topk_encode(x, error, k, chunk, bits, out)


def _triton_topk_decode(payload, lay, out, count):
    with on_device(out):
        _triton_module().topk_decode(payload, lay.n, lay.k, lay.chunk, lay.bits, out, count)
    return 0


def _triton_quant_encode(x, error, bits, block, scaling, out):
    with on_device(x):
        _triton_module().quant_encode(x, error, bits, block, scaling, out)


def _triton_quant_decode(payload, lay, out):
    with on_device(out):
        _triton_module().quant_decode(payload, lay.n, lay.block, lay.bits, lay.scaling, out)


_KERNELS = {
    "reference": (lambda x, e, k, c, b, o: o.copy_(reference_topk_encode(x, e, k, c, b)),
                  reference_topk_decode,
                  lambda x, e, b, blk, s, o: o.copy_(reference_quant_encode(x, e, b, blk, s)),
                  reference_quant_decode),
    "cpu": (_cpu_topk_encode, _cpu_topk_decode, _cpu_quant_encode, _cpu_quant_decode),
    "cuda": (_cuda_topk_encode, _cuda_topk_decode, _cuda_quant_encode, _cuda_quant_decode),
    "triton": (_triton_topk_encode, _triton_topk_decode, _triton_quant_encode, _triton_quant_decode),
}


# The GPU kernels hold a chunk (top-k) / block (quantiser) on chip: csrc/cuda/compress.cu and
# kernels/compress.py say why these sizes.
GPU_MAX_CHUNK = 8192
GPU_MAX_BLOCK = 4096


def _gpu_limits(chunk: int = 1, block: int = 1, **_) -> str | None:
    if chunk > GPU_MAX_CHUNK:
        return f"chunk {chunk} > {GPU_MAX_CHUNK} (the GPU kernels keep a chunk on chip)"
    if block > GPU_MAX_BLOCK:
        return f"block {block} > {GPU_MAX_BLOCK} (the GPU kernels keep a block on chip)"
    return None


DISPATCH = Dispatcher(
    "compress",
    [
        BackendSpec("cuda", ("cuda",), X_DTYPES, extension_available("_C_cuda"), _gpu_limits),
        BackendSpec("triton", ("cuda",), X_DTYPES, triton_available("compress"), _gpu_limits),
        BackendSpec("cpu", ("cpu",), X_DTYPES, extension_available("_C"),
                    on_skip=lambda: _native.warn_missing_once("_C")),
        BackendSpec("reference", ("cpu", "cuda"), X_DTYPES),
    ],
)


# ----------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; fake implementations give it shapes)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("thresher::topk_encode", mutates_args=("error",))
def _topk_encode_op(x: Tensor, error: Optional[Tensor], k: int, chunk: int, bits: int,
                    backend: str) -> Tensor:
    out = torch.empty(topk_nbytes(x.numel(), k, chunk, bits), dtype=torch.uint8, device=x.device)
    if out.numel():
        _KERNELS[backend][0](x, error, k, chunk, bits, out)
    return out


@_topk_encode_op.register_fake
def _(x, error, k, chunk, bits, backend):
    return x.new_empty(topk_nbytes(x.numel(), k, chunk, bits), dtype=torch.uint8)


@torch.library.custom_op("thresher::topk_decode_add", mutates_args=("out", "count"))
def _topk_decode_op(payload: Tensor, out: Tensor, count: Optional[Tensor], k: int, chunk: int,
                    bits: int, backend: str) -> Tensor:
    """out += decoded (count += 1 where a value landed); returns the number of out-of-chunk
    indices found (skipped), as a 0-d int64 tensor."""
    lay = TopKLayout(out.numel(), k, chunk, bits)
    bad = _KERNELS[backend][1](payload, lay, out, count) if lay.n_chunks else 0
    return torch.tensor(bad, dtype=torch.int64)


@_topk_decode_op.register_fake
def _(payload, out, count, k, chunk, bits, backend):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("thresher::quant_encode", mutates_args=("error",))
def _quant_encode_op(x: Tensor, error: Optional[Tensor], bits: int, block: int, scaling: str,
                     backend: str) -> Tensor:
    out = torch.empty(quant_nbytes(x.numel(), bits, block, scaling), dtype=torch.uint8,
                      device=x.device)
    if out.numel():
        _KERNELS[backend][2](x, error, bits, block, scaling, out)
    return out


@_quant_encode_op.register_fake
def _(x, error, bits, block, scaling, backend):
    return x.new_empty(quant_nbytes(x.numel(), bits, block, scaling), dtype=torch.uint8)


@torch.library.custom_op("thresher::quant_decode_add", mutates_args=("out",))
def _quant_decode_op(payload: Tensor, out: Tensor, bits: int, block: int, scaling: str,
                     backend: str) -> None:
    lay = QuantLayout(out.numel(), block, bits, scaling)
    if lay.n_blocks:
        _KERNELS[backend][3](payload, lay, out)


@_quant_decode_op.register_fake
def _(payload, out, bits, block, scaling, backend):
    return None


def _plain(*ts) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the dispatch-stack query
        return False
    return (torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) is torch.Tensor for t in ts))


def _call(op, *args):
    """Runs a custom op; plain eager calls (no tracing, no fake/functional tensors, no
    dispatch mode) go straight to its implementation: the ops have no autograd formula, so
    the dispatcher adds nothing there but its per-call overhead and, on the first call in a
    process, an import of torch._dynamo (seconds on a loaded machine) -- which every spawned
    rank of a distributed job would pay."""
    if _plain(*(a for a in args if isinstance(a, torch.Tensor) or a is None)):
        return op._init_fn(*args)
    return op(*args)


# ----------------------------------------------------------------------------------------
# Validation and the public functions
# ----------------------------------------------------------------------------------------


def _check_int(name: str, v, lo: int, hi: int = MAX_CHUNK) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


def _check_bits(bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    check_choice("bits", bits, BITS)


def _check_error(error, x) -> None:
    if error is None:
        return
    check_tensor("error", error, dtypes=(torch.float32,), device=x.device)
    if error.numel() != x.numel():
        raise ValueError(f"error must have as many elements as x ({x.numel()}), got "
                         f"{error.numel()} (shape {tuple(error.shape)})")
    if not error.is_contiguous():
        raise ValueError("error must be contiguous (it is updated in place)")


def _check_finite_scales(payload: Tensor, n_units: int, per_unit: int, unit: str,
                         decoding: bool = False) -> None:
    """The payload's float32 header (scales; offsets first for meanstd) must be finite: the
    encoders' scale is non-finite exactly when the chunk/block held NaN or inf, and a decoder
    given a non-finite scale would spread it over the whole chunk/block silently."""
    if not n_units or not values_checkable():
        return
    s = payload[: 4 * n_units * per_unit].view(torch.float32)
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if decoding:
            raise ValueError(f"payload must hold finite scales and offsets: {unit} {i % n_units}'s "
                             f"is {s[i].item()} (a corrupted message)")
        raise ValueError(f"x (+ error) must be finite: {unit} {i % n_units} holds NaN or inf")


def _flat_x(x: Tensor) -> Tensor:
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def topk_encode(x: Tensor, error: Tensor | None = None, *, k: int = 64, chunk: int = 4096,
                bits: int = 2, backend: str = "auto") -> Tensor:
    """Top-k per chunk + quantisation + error feedback + packing (docs/kernels.md). Returns
    the payload (1-D uint8 of exactly ``topk_nbytes(x.numel(), k, chunk, bits)`` bytes);
    ``error`` (float32, as many elements as ``x``, contiguous) is updated in place."""
    check_tensor("x", x, dtypes=X_DTYPES)
    check_has_data("x", x)
    _check_error(error, x)
    _check_int("k", k, 1)
    _check_int("chunk", chunk, 1)
    _check_bits(bits)
    name = DISPATCH.select(backend, x.device, x.dtype, chunk=chunk)
    payload = _call(_topk_encode_op, _flat_x(x), error, k, chunk, bits, name)
    _check_finite_scales(payload, -(-x.numel() // chunk), 1, "chunk")
    return payload


def _check_payload(payload, nbytes: int, device) -> None:
    check_tensor("payload", payload, ndim=1, dtypes=(torch.uint8,), device=device)
    check_has_data("payload", payload)
    if payload.numel() != nbytes:
        raise ValueError(f"payload must have exactly {nbytes} bytes for these settings, got "
                         f"{payload.numel()} (wrong numel/k/chunk/bits, or a truncated message)")


def _check_out(out, numel: int, device, what: str):
    if out is None:
        return torch.zeros(numel, dtype=torch.float32, device=device)
    check_tensor(what, out, dtypes=(torch.float32,), device=device)
    if out.numel() != numel:
        raise ValueError(f"{what} must have {numel} elements, got {out.numel()}")
    if not out.is_contiguous():
        raise ValueError(f"{what} must be contiguous (it is accumulated into in place)")
    return out


def topk_decode(payload: Tensor, numel: int, *, k: int = 64, chunk: int = 4096, bits: int = 2,
                out: Tensor | None = None, count: Tensor | None = None,
                backend: str = "auto") -> Tensor:
    """Adds the decoded values of a top-k payload into ``out`` (float32, ``numel`` elements;
    zeros when None) and, when ``count`` (int32, same size) is given, adds 1 where a value
    landed. Returns ``out``. Raises ValueError for indices outside their chunk (cpu and
    reference; the GPU backends skip them)."""
    _check_int("numel", numel, 0, 2**62)
    _check_int("k", k, 1)
    _check_int("chunk", chunk, 1)
    _check_bits(bits)
    _check_payload(payload, topk_nbytes(numel, k, chunk, bits), payload.device
                   if isinstance(payload, Tensor) else None)
    out = _check_out(out, numel, payload.device, "out")
    if count is not None:
        check_tensor("count", count, dtypes=(torch.int32,), device=payload.device)
        if count.numel() != numel or not count.is_contiguous():
            raise ValueError(f"count must be a contiguous int32 tensor of {numel} elements")
    name = DISPATCH.select(backend, payload.device, torch.float32, chunk=chunk)
    _check_finite_scales(payload, -(-numel // chunk), 1, "chunk", decoding=True)
    bad = _call(_topk_decode_op, payload, out, count, k, chunk, bits, name)
    if values_checkable() and int(bad):
        raise ValueError(f"payload holds {int(bad)} indices outside their chunk (corrupted "
                         "message, or decoded with other numel/k/chunk/bits than encoded)")
    return out


def quantize_blockwise(x: Tensor, error: Tensor | None = None, *, bits: int = 8, block: int = 256,
                       scaling: str = "absmax", backend: str = "auto") -> Tensor:
    """Blockwise 8/4/2-bit quantisation of ``x`` (with error feedback into ``error`` when
    given). Returns the payload of exactly ``quant_nbytes(x.numel(), bits, block, scaling)``."""
    check_tensor("x", x, dtypes=X_DTYPES)
    check_has_data("x", x)
    _check_error(error, x)
    _check_bits(bits)
    _check_int("block", block, 1)
    check_choice("scaling", scaling, SCALINGS)
    name = DISPATCH.select(backend, x.device, x.dtype, block=block)
    payload = _call(_quant_encode_op, _flat_x(x), error, bits, block, scaling, name)
    _check_finite_scales(payload, -(-x.numel() // block), 2 if scaling == "meanstd" else 1, "block")
    return payload


def dequantize_blockwise(payload: Tensor, numel: int, *, bits: int = 8, block: int = 256,
                         scaling: str = "absmax", out: Tensor | None = None,
                         backend: str = "auto") -> Tensor:
    """Adds the dequantised payload into ``out`` (float32, zeros when None); returns it."""
    _check_int("numel", numel, 0, 2**62)
    _check_bits(bits)
    _check_int("block", block, 1)
    check_choice("scaling", scaling, SCALINGS)
    _check_payload(payload, quant_nbytes(numel, bits, block, scaling), payload.device
                   if isinstance(payload, Tensor) else None)
    out = _check_out(out, numel, payload.device, "out")
    name = DISPATCH.select(backend, payload.device, torch.float32, block=block)
    _check_finite_scales(payload, -(-numel // block), 2 if scaling == "meanstd" else 1, "block",
                         decoding=True)
    _call(_quant_decode_op, payload, out, bits, block, scaling, name)
    return out
