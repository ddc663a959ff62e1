"""thresher.comm: compression codecs (top-k, quantisers, low-rank), collectives and exact byte accounting.

    codec = TopKCodec(k=64, chunk=4096, bits=2)      # or QuantCodec(bits=8, block=256),
                                                     #    LowRankCodec(rank=4)
    packed = codec.encode(x, error=e)                # e += x; compress; e -= decoded
    packed.nbytes                                    # exact message bytes
    mean = sparse_all_gather_mean(packed, stats=s)   # mean over ranks (per index for top-k)
    s.bytes_sent                                     # what this rank sent

A failed, timed-out or mismatched collective raises ``CollectiveError`` (``CommError`` is
the same class under its older name).
"""
from .codecs import Codec, LowRankCodec, Packed, QuantCodec, TopKCodec
from .collectives import (
    DEFAULT_TIMEOUT_S,
    HEADER_BYTES,
    CollectiveError,
    CommError,
    CommStats,
    sparse_all_gather_mean,
)

__all__ = [
    "Codec",
    "Packed",
    "TopKCodec",
    "QuantCodec",
    "LowRankCodec",
    "CollectiveError",
    "CommError",
    "DEFAULT_TIMEOUT_S",
    "CommStats",
    "HEADER_BYTES",
    "sparse_all_gather_mean",
]
