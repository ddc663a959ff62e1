"""Glue between the optimizers and ``thresher.comm``: a codec from a name, and the
compressed mean of a list of tensors with per-tensor error feedback.

Names: ``"topk"`` (``TopKCodec``: top-k per chunk, quantised values, packed indices; options
k=64, chunk=4096, bits=2) and ``"quant8"``/``"quant4"``/``"quant2"`` (``QuantCodec``:
blockwise absmax, block=256); any ``thresher.comm.Codec`` object (``LowRankCodec`` too) is
used as given. Aggregation is ``thresher.comm.sparse_all_gather_mean``: a top-k message is
averaged over the ranks that sent each index (SparseLoCo's rule), a dense one over all ranks.
Bytes per tensor and sync: ``HEADER_BYTES`` (16) + the packed message.
"""
from __future__ import annotations

import torch

from ._dist import GroupInfo

CODEC_NAMES = ("topk", "quant8", "quant4", "quant2")


def make_codec(spec, **options):
    """None -> None; a name in CODEC_NAMES (with ``options``) -> the thresher.comm codec; a
    ``thresher.comm.Codec`` -> itself. Anything else is a ValueError naming what is accepted."""
    if spec is None:
        return None
    from thresher import comm

    if isinstance(spec, comm.Codec):
        return spec
    if not isinstance(spec, str) or spec not in CODEC_NAMES:
        raise ValueError(f"compression must be None, a thresher.comm.Codec or one of "
                         f"{CODEC_NAMES}, got {spec!r}")
    if spec == "topk":
        return comm.TopKCodec(**options)
    return comm.QuantCodec(bits=int(spec[5:]), **options)


@torch.no_grad()
def codec_mean_(tensors, errors, codec, info: GroupInfo, what: str = "compressed sync") -> int:
    """Replaces each tensor x by the mean over ranks of decode(encode(x, error=e)); each error
    buffer e is updated in place (e += x, then e -= what was sent). Returns the bytes sent."""
    from thresher import comm

    stats = comm.CommStats()
    for x, e in zip(tensors, errors):
        packed = codec.encode(x, error=e)
        mean = comm.sparse_all_gather_mean(packed, group=info.group, timeout=info.timeout_s,
                                           stats=stats)
        x.copy_(mean)
    return stats.bytes_sent
