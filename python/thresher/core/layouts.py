"""Byte layouts of the compression payloads (top-k and blockwise quantiser), integer arithmetic
only: the ops (``thresher.ops.compress``) and the Triton launchers (``thresher.kernels.compress``)
both read them from here, and they mirror csrc/common/compress.h's ``topk_layout`` /
``quant_layout``. The formats are described in docs/kernels.md ("Compression")."""
from __future__ import annotations

__all__ = ["index_bits", "packed_nbytes", "TopKLayout", "topk_layout", "QuantLayout"]


def index_bits(chunk: int) -> int:
    """Bits per packed index: 12 for chunks <= 4096, 16 up to 65536, else 32."""
    return 12 if chunk <= 4096 else (16 if chunk <= 65536 else 32)


def packed_nbytes(count: int, width: int) -> int:
    """Bytes of ``count`` items of ``width`` bits packed back to back (the last byte padded)."""
    return (count * width + 7) // 8


class TopKLayout:
    """Byte layout of a top-k payload (mirrors csrc/common/compress.h topk_layout)."""

    def __init__(self, n: int, k: int, chunk: int, bits: int):
        self.n, self.k, self.chunk, self.bits = n, k, chunk, bits
        self.ibits = index_bits(chunk)
        self.n_chunks = -(-n // chunk)
        self.last_len = n - (self.n_chunks - 1) * chunk if self.n_chunks else 0
        self.k_full = min(k, chunk)
        self.k_last = min(k, self.last_len)
        self.vb_full = packed_nbytes(self.k_full, bits)
        self.ib_full = packed_nbytes(self.k_full, self.ibits)
        nfull = max(self.n_chunks - 1, 0)
        has = self.n_chunks > 0
        self.values_off = 4 * self.n_chunks
        self.indices_off = (self.values_off + nfull * self.vb_full
                            + (packed_nbytes(self.k_last, bits) if has else 0))
        self.total = (self.indices_off + nfull * self.ib_full
                      + (packed_nbytes(self.k_last, self.ibits) if has else 0))
        self.n_selected = nfull * self.k_full + (self.k_last if has else 0)


def topk_layout(n: int, k: int, chunk: int, bits: int) -> TopKLayout:
    return TopKLayout(n, k, chunk, bits)


class QuantLayout:
    """Byte layout of a blockwise-quantiser payload: ``[float32 offset[n_blocks] (meanstd)] |
    float32 scale[n_blocks] | codes``."""

    def __init__(self, n: int, block: int, bits: int, scaling: str):
        self.n, self.block, self.bits, self.scaling = n, block, bits, scaling
        self.n_blocks = -(-n // block)
        self.last_len = n - (self.n_blocks - 1) * block if self.n_blocks else 0
        self.vb_full = packed_nbytes(block, bits)
        self.scale_off = 4 * self.n_blocks if scaling == "meanstd" else 0
        self.codes_off = self.scale_off + 4 * self.n_blocks
        self.total = self.codes_off + ((self.n_blocks - 1) * self.vb_full
                                       + packed_nbytes(self.last_len, bits) if self.n_blocks else 0)
