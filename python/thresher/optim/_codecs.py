"""Glue between the optimizers and ``thresher.comm``'s codecs: building a codec from a name,
and the compressed mean of a list of tensors with per-tensor error feedback."""
from __future__ import annotations

import torch

from ._dist import GroupInfo, all_gather_bytes

CODEC_NAMES = ("topk", "quant8", "quant4", "quant2")


def make_codec(spec, **options):
    """None -> None; a name in CODEC_NAMES -> the thresher.comm codec; a codec object (has
    ``encode`` and ``decode``) -> itself. Anything else is a ValueError."""
    if spec is None:
        return None
    if hasattr(spec, "encode") and hasattr(spec, "decode"):
        return spec
    if not isinstance(spec, str) or spec not in CODEC_NAMES:
        raise ValueError(f"compression must be None, a thresher.comm codec or one of "
                         f"{CODEC_NAMES}, got {spec!r}")
    try:
        from thresher import comm
    except ImportError as exc:  # pragma: no cover
        raise ImportError(f"compression={spec!r} needs thresher.comm: {exc}") from exc
    if spec == "topk":
        if not hasattr(comm, "TopKCodec"):
            raise ImportError("compression='topk' needs thresher.comm.TopKCodec, which this "
                              "build of thresher does not have yet")
        return comm.TopKCodec(**options)
    if not hasattr(comm, "QuantCodec"):
        raise ImportError(f"compression={spec!r} needs thresher.comm.QuantCodec, which this "
                          "build of thresher does not have yet")
    return comm.QuantCodec(bits=int(spec[5:]), **options)


@torch.no_grad()
def codec_mean_(tensors, errors, codec, info: GroupInfo, what: str = "compressed all_gather") -> int:
    """Replaces each tensor x by the mean over ranks of decode(encode(x, error=e)) (the error
    buffers e updated in place), aggregated with one all_gather. Returns the bytes sent."""
    raise NotImplementedError("waiting for thresher.comm")
