"""Compression codecs: ``TopKCodec``, ``QuantCodec``, ``LowRankCodec``, on the ops of
thresher.ops.compress and thresher.ops.lowrank. Every codec has one surface (``encode`` with
optional error feedback, ``decode`` into a new tensor or accumulating into ``out``, ``nbytes``,
``unpack``) and its messages carry no header. The surface, error feedback and the byte counts:
docs/communication.md ("Codecs")."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from thresher.core.checks import check_choice, check_has_data, check_int, check_tensor
from thresher.ops.compress import (
    SCALINGS,
    check_bits,
    dequantize_blockwise,
    quant_nbytes,
    quantize_blockwise,
    topk_decode,
    topk_encode,
    topk_nbytes,
)
from thresher.ops.lowrank import choose_side, project, project_back, refresh_projection

__all__ = ["Packed", "Codec", "TopKCodec", "QuantCodec", "LowRankCodec"]

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Packed:
    """One encoded tensor: the message ``data`` (1-D uint8) and what the receiver knows
    anyway (shape, dtype, the codec's settings). ``nbytes`` is exactly ``data.numel()``."""

    data: Tensor
    shape: torch.Size
    dtype: torch.dtype
    codec: "Codec"

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Codec:
    """Base class. Subclasses implement ``_encode_flat`` (float view of x, error) -> data,
    ``_decode_add`` (data, float32 flat out, int32 count | None) and ``nbytes``."""

    #: True when a message carries only some indices (aggregation averages over the ranks
    #: that sent each index); False for dense codecs (every rank sends every element).
    sparse = False
    backend = "auto"

    def settings(self) -> dict:
        raise NotImplementedError

    def fingerprint(self, shape) -> int:
        """A 63-bit hash of the settings and shape (peers check they decode alike)."""
        text = repr((type(self).__name__, sorted(self.settings().items()), tuple(shape)))
        return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") >> 1

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    def _check_x(self, x, error):
        check_tensor("x", x, dtypes=_FLOAT)
        check_has_data("x", x)
        if error is not None:
            check_tensor("error", error, dtypes=(torch.float32,), device=x.device)
            if error.numel() != x.numel() or not error.is_contiguous():
                raise ValueError(f"error must be a contiguous float32 tensor of x's {x.numel()} "
                                 f"elements, got shape {tuple(error.shape)}")

    def encode(self, x: Tensor, error: Tensor | None = None) -> Packed:
        self._check_x(x, error)
        data = self._encode_flat(x, error)
        return Packed(data, x.shape, x.dtype, self)

    def unpack(self, data: Tensor, shape, dtype=torch.float32) -> Packed:
        """A Packed from a received message (checks its size)."""
        shape = torch.Size(shape)
        check_tensor("data", data, ndim=1, dtypes=(torch.uint8,))
        want = self.nbytes(shape)
        if data.numel() != want:
            raise ValueError(f"data must have {want} bytes for {self!r} and shape {tuple(shape)}, "
                             f"got {data.numel()}")
        return Packed(data, shape, dtype, self)

    def decode(self, packed: Packed, out: Tensor | None = None,
               count: Tensor | None = None) -> Tensor:
        """The decoded tensor (shape and dtype of the encoded x); with ``out``, adds it into
        ``out`` (any float dtype, same number of elements) and returns ``out``. ``count``
        (int32, same number of elements, contiguous) gets +1 wherever the message carries a
        value -- every element for dense codecs, the sent indices for top-k -- which is what
        a mean over the ranks that sent each index needs (see sparse_all_gather_mean)."""
        if not isinstance(packed, Packed):
            raise TypeError(f"packed must be a thresher.comm.Packed, got {type(packed).__name__}")
        n = packed.numel
        dev = packed.data.device
        check_has_data("packed.data", packed.data)
        if count is not None:
            check_tensor("count", count, dtypes=(torch.int32,), device=dev)
            if count.numel() != n or not count.is_contiguous():
                raise ValueError(f"count must be a contiguous int32 tensor of {n} elements")
            count = count.view(-1)
            if not self.sparse:
                count += 1
        sparse_count = count if self.sparse else None
        if out is None:
            acc = torch.zeros(n, dtype=torch.float32, device=dev)
            self._decode_add(packed, acc, sparse_count)
            return acc.view(packed.shape).to(packed.dtype)
        check_tensor("out", out, dtypes=_FLOAT + (torch.float64,), device=dev)
        if out.numel() != n:
            raise ValueError(f"out must have {n} elements, got {out.numel()}")
        if out.dtype == torch.float32 and out.is_contiguous():
            self._decode_add(packed, out.view(-1), sparse_count)
        else:
            acc = torch.zeros(n, dtype=torch.float32, device=dev)
            self._decode_add(packed, acc, sparse_count)
            out.add_(acc.view(out.shape).to(out.dtype))
        return out

    # subclasses
    def nbytes(self, shape) -> int:
        raise NotImplementedError

    def _encode_flat(self, x, error) -> Tensor:
        raise NotImplementedError

    def _decode_add(self, packed, out_flat, count) -> None:
        raise NotImplementedError


class TopKCodec(Codec):
    """Top-``k`` per ``chunk`` of |x + e|, ``bits``-bit values with a per-chunk scale, 12/16/32
    bit indices (thresher.ops.topk_encode: the fused kernel). Bytes per full chunk:
    ``4 + ceil(k bits / 8) + ceil(k w / 8)``, w = 12 for chunk <= 4096 (116 B at the
    defaults, for 16 KiB of fp32)."""

    sparse = True

    def __init__(self, k: int = 64, chunk: int = 4096, bits: int = 2, backend: str = "auto"):
        k, chunk = check_int("k", k, 1), check_int("chunk", chunk, 1)
        check_bits(bits)
        self.k, self.chunk, self.bits, self.backend = k, chunk, bits, backend

    def settings(self):
        return {"k": self.k, "chunk": self.chunk, "bits": self.bits}

    def nbytes(self, shape) -> int:
        return topk_nbytes(math.prod(shape), self.k, self.chunk, self.bits)

    def _encode_flat(self, x, error):
        return topk_encode(x, error, k=self.k, chunk=self.chunk, bits=self.bits,
                           backend=self.backend)

    def _decode_add(self, packed, out_flat, count):
        topk_decode(packed.data, packed.numel, k=self.k, chunk=self.chunk, bits=self.bits,
                    out=out_flat, count=count, backend=self.backend)


class QuantCodec(Codec):
    """Every element, ``bits`` bits, one scale (absmax) or mean + scale (meanstd) per
    ``block`` (thresher.ops.quantize_blockwise). Bytes: ``4 n_blocks (x2 meanstd) +
    sum_b ceil(len_b bits / 8)``."""

    def __init__(self, bits: int = 8, block: int = 256, scaling: str = "absmax",
                 backend: str = "auto"):
        check_bits(bits)
        block = check_int("block", block, 1)
        check_choice("scaling", scaling, SCALINGS)
        self.bits, self.block, self.scaling, self.backend = bits, block, scaling, backend

    def settings(self):
        return {"bits": self.bits, "block": self.block, "scaling": self.scaling}

    def nbytes(self, shape) -> int:
        return quant_nbytes(math.prod(shape), self.bits, self.block, self.scaling)

    def _encode_flat(self, x, error):
        return quantize_blockwise(x, error, bits=self.bits, block=self.block,
                                  scaling=self.scaling, backend=self.backend)

    def _decode_add(self, packed, out_flat, count):
        dequantize_blockwise(packed.data, packed.numel, bits=self.bits, block=self.block,
                             scaling=self.scaling, out=out_flat, backend=self.backend)


class LowRankCodec(Codec):
    """Rank-``rank`` factorisation of a matrix (tensors of more than 2 dims are viewed as
    ``(shape[0], -1)``; 1-D tensors as a column): with side "right" (``p >= q``, GaLore's
    rule), ``M ~ R Q^T`` with an orthonormal ``Q`` (q x r) from
    thresher.ops.lowrank.refresh_projection and ``R = M Q`` (p x r); side "left" mirrors it.
    Both factors are sent in float32: ``4 r (p + q)`` bytes. ``method="power"`` warm-starts
    from the basis of the previous call on the same shape (one power iteration, PowerSGD's
    trick); the first call, and ``"random"``, use a randomised SVD from ``seed``.
    """

    def __init__(self, rank: int = 4, method: str = "power", seed: int = 0,
                 backend: str = "auto"):
        rank = check_int("rank", rank, 1)
        check_choice("method", method, ("power", "random", "svd"))
        self.rank, self.method, self.seed, self.backend = rank, method, seed, backend
        self._prev: dict[tuple, Tensor] = {}

    def settings(self):
        return {"rank": self.rank, "method": self.method}

    @staticmethod
    def _matrix_shape(shape) -> tuple[int, int]:
        shape = tuple(shape)
        if len(shape) == 0:
            return (1, 1)
        if len(shape) == 1:
            return (shape[0], 1)
        return (shape[0], math.prod(shape[1:]))

    def _dims(self, shape):
        p, q = self._matrix_shape(shape)
        r = min(self.rank, p, q)
        side = choose_side((p, q))
        return p, q, r, side

    def nbytes(self, shape) -> int:
        p, q, r, _ = self._dims(shape)
        return 4 * r * (p + q) if p * q else 0

    def _encode_flat(self, x, error):
        p, q, r, side = self._dims(x.shape)
        if p * q == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        xf = x.reshape(p, q).to(torch.float32)
        M = error.view(p, q).add_(xf) if error is not None else xf
        key = (p, q, str(x.device))
        prev = self._prev.get(key) if self.method == "power" else None
        Q = refresh_projection(M, r, side=side, method=self.method, prev=prev, seed=self.seed)
        self._prev[key] = Q
        R = project(M, Q, side).contiguous()
        if error is not None:
            error.view(p, q).sub_(project_back(R, Q, side))
        return torch.cat([R.reshape(-1).view(torch.uint8), Q.contiguous().reshape(-1).view(torch.uint8)])

    def _decode_add(self, packed, out_flat, count):
        p, q, r, side = self._dims(packed.shape)
        if p * q == 0:
            return
        nr = 4 * (r * q if side == "left" else p * r)
        R = packed.data[:nr].view(torch.float32).view((r, q) if side == "left" else (p, r))
        Q = packed.data[nr:].view(torch.float32).view((p, r) if side == "left" else (q, r))
        out_flat.view(p, q).add_(project_back(R, Q, side))
