"""The compression family's PyTorch maths: bit packing (also public, from
``thresher.ops.compress``) and the reference backend's encoders and decoders, plain PyTorch
(torch.topk, arithmetic, bit ops) that produce the same bytes and error buffer as the
kernels, bit for bit. Called by ops/_compress_backends.py. The maths and the payloads:
docs/kernels.md ("Compression")."""
from __future__ import annotations

import torch
from torch import Tensor

from thresher.core.layouts import QuantLayout, TopKLayout, index_bits, packed_nbytes

__all__ = [
    "X_DTYPES",
    "pack_bits",
    "unpack_bits",
    "pack_indices",
    "unpack_indices",
    "reference_topk_encode",
    "reference_topk_decode",
    "reference_quant_encode",
    "reference_quant_decode",
]

# The dtypes of x the encoders take (every backend runs them all).
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# c_b / 2 of csrc/common/compress.h (meanstd_half_step), as float32.
_MEANSTD_HALF_STEP = {2: 0.49785, 4: 0.1676, 8: 0.0154}


# ----------------------------------------------------------------------------------------
# Bit packing (the reference's building blocks)
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
