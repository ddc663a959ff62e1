"""Glue between the optimizers and the compressed-communication ops
(``thresher.ops.compress``): building a codec from a name, and the compressed mean of a list
of tensors with per-tensor error feedback over one all_gather.

Names: ``"topk"`` (top-k per chunk, quantised values, indices packed; options k=64,
chunk=4096, bits=2) and ``"quant8"``/``"quant4"``/``"quant2"`` (blockwise absmax quantiser,
block=256). A top-k message is averaged over the ranks that sent each index (SparseLoCo's
rule: an index only one rank chose is not halved); a quantised message over all ranks.
"""
from __future__ import annotations

import torch

from ._dist import GroupInfo, all_gather_bytes

CODEC_NAMES = ("topk", "quant8", "quant4", "quant2")


class TopK:
    """``thresher.ops.compress.topk_encode/topk_decode`` with fixed settings."""

    per_sender_mean = True

    def __init__(self, k: int = 64, chunk: int = 4096, bits: int = 2):
        self.k, self.chunk, self.bits = int(k), int(chunk), int(bits)

    def __repr__(self):
        return f"TopK(k={self.k}, chunk={self.chunk}, bits={self.bits})"

    def nbytes(self, numel: int) -> int:
        from thresher.ops.compress import topk_nbytes

        return topk_nbytes(numel, self.k, self.chunk, self.bits)

    def encode(self, x, error):
        from thresher.ops.compress import topk_encode

        return topk_encode(x, error, k=self.k, chunk=self.chunk, bits=self.bits)

    def decode(self, payload, numel, out, count):
        from thresher.ops.compress import topk_decode

        topk_decode(payload, numel, k=self.k, chunk=self.chunk, bits=self.bits, out=out,
                    count=count)


class Quant:
    """``thresher.ops.compress.quantize_blockwise/dequantize_blockwise`` (absmax)."""

    per_sender_mean = False

    def __init__(self, bits: int = 8, block: int = 256):
        self.bits, self.block = int(bits), int(block)

    def __repr__(self):
        return f"Quant(bits={self.bits}, block={self.block})"

    def nbytes(self, numel: int) -> int:
        from thresher.ops.compress import quant_nbytes

        return quant_nbytes(numel, self.bits, self.block)

    def encode(self, x, error):
        from thresher.ops.compress import quantize_blockwise

        return quantize_blockwise(x, error, bits=self.bits, block=self.block)

    def decode(self, payload, numel, out, count):
        from thresher.ops.compress import dequantize_blockwise

        dequantize_blockwise(payload, numel, bits=self.bits, block=self.block, out=out)


def make_codec(spec, **options):
    """None -> None; a name in CODEC_NAMES (with ``options``) -> the codec; a TopK/Quant
    object -> itself. Anything else is a ValueError naming the accepted values."""
    if spec is None:
        return None
    if isinstance(spec, (TopK, Quant)):
        return spec
    if not isinstance(spec, str) or spec not in CODEC_NAMES:
        raise ValueError(f"compression must be None or one of {CODEC_NAMES} (or a "
                         f"thresher.optim codec object), got {spec!r}")
    if spec == "topk":
        return TopK(**options)
    return Quant(bits=int(spec[5:]), **options)


@torch.no_grad()
def codec_mean_(tensors, errors, codec, info: GroupInfo, what: str = "compressed all_gather") -> int:
    """Replaces each float32 tensor x by the mean over ranks of decode(encode(x, error=e))
    (each error buffer e updated in place: e += x, then e -= what was sent), in ONE
    all_gather of the concatenated messages (their sizes follow from the shapes, so no
    per-tensor header is needed). Returns the bytes this rank sent."""
    if not tensors:
        return 0
    for x, e in zip(tensors, errors):
        if x.dtype != torch.float32 or e.dtype != torch.float32:
            raise TypeError(f"compressed sync needs float32 parameters, got {x.dtype}")
    msg = torch.cat([codec.encode(x.contiguous(), e) for x, e in zip(tensors, errors)])
    messages, sent = all_gather_bytes(msg, info, what)
    offsets, off = [], 0
    for x in tensors:
        n = codec.nbytes(x.numel())
        offsets.append((off, n))
        off += n
    for x, (o, n) in zip(tensors, offsets):
        out = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
        count = torch.zeros(x.numel(), dtype=torch.int32, device=x.device) \
            if codec.per_sender_mean else None
        for m in messages:
            codec.decode(m[o:o + n], x.numel(), out, count)
        if count is not None:
            out.div_(count.clamp_min(1))
        else:
            out.div_(len(messages))
        x.copy_(out.view_as(x))
    return sent
