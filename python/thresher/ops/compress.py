"""Compressed-communication ops: top-k per chunk with fused error feedback, blockwise 8/4/2-bit
quantisers and their decoders (decode-and-accumulate): ``topk_encode``, ``topk_decode``,
``quantize_blockwise``, ``dequantize_blockwise``, ``topk_nbytes``, ``quant_nbytes`` (exported
from ``thresher.ops``), with every argument check; from this module also ``check_bits``, the
bit packing (``pack_bits``, ``pack_indices``, ...) and the payload layouts (``TopKLayout``,
``QuantLayout``: thresher.core.layouts).

The op is split by job: this module (public API and checks), ``_compress_backends`` (the
backends, the one dispatcher ``DISPATCH``, the custom ops) and ``_compress_reference`` (bit
packing and the PyTorch reference, ``reference_topk_encode``, ...). Every backend produces the
same bytes and error buffer, bit for bit. The maths, the payloads and the non-finite-input
rules: docs/kernels.md ("Compression"); signatures: docs/interfaces.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from thresher.core.checks import check_choice, check_has_data, check_tensor, values_checkable
from thresher.core.layouts import QuantLayout, TopKLayout, index_bits, topk_layout

from ._compress_backends import (
    DISPATCH,
    call_op,
    quant_decode_op,
    quant_encode_op,
    topk_decode_op,
    topk_encode_op,
)
from ._compress_reference import (
    X_DTYPES,
    pack_bits,
    pack_indices,
    reference_quant_decode,
    reference_quant_encode,
    reference_topk_decode,
    reference_topk_encode,
    unpack_bits,
    unpack_indices,
)

__all__ = [
    "topk_encode",
    "topk_decode",
    "quantize_blockwise",
    "dequantize_blockwise",
    "topk_nbytes",
    "quant_nbytes",
    "check_bits",
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

BITS = (2, 4, 8)
SCALINGS = ("absmax", "meanstd")
MAX_CHUNK = 2**31 - 1


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
# Validation and the public functions
# ----------------------------------------------------------------------------------------


def _check_int(name: str, v, lo: int, hi: int = MAX_CHUNK) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


def check_bits(bits) -> None:
    """``bits`` (the width of a code) is an int in ``BITS``: TypeError / ValueError naming it.
    The codecs (thresher.comm) check theirs with it too."""
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
    check_bits(bits)
    name = DISPATCH.select(backend, x.device, x.dtype, chunk=chunk)
    payload = call_op(topk_encode_op, _flat_x(x), error, k, chunk, bits, name)
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
    check_bits(bits)
    _check_payload(payload, topk_nbytes(numel, k, chunk, bits), payload.device
                   if isinstance(payload, Tensor) else None)
    out = _check_out(out, numel, payload.device, "out")
    if count is not None:
        check_tensor("count", count, dtypes=(torch.int32,), device=payload.device)
        if count.numel() != numel or not count.is_contiguous():
            raise ValueError(f"count must be a contiguous int32 tensor of {numel} elements")
    name = DISPATCH.select(backend, payload.device, torch.float32, chunk=chunk)
    _check_finite_scales(payload, -(-numel // chunk), 1, "chunk", decoding=True)
    bad = call_op(topk_decode_op, payload, out, count, k, chunk, bits, name)
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
    check_bits(bits)
    _check_int("block", block, 1)
    check_choice("scaling", scaling, SCALINGS)
    name = DISPATCH.select(backend, x.device, x.dtype, block=block)
    payload = call_op(quant_encode_op, _flat_x(x), error, bits, block, scaling, name)
    _check_finite_scales(payload, -(-x.numel() // block), 2 if scaling == "meanstd" else 1, "block")
    return payload


def dequantize_blockwise(payload: Tensor, numel: int, *, bits: int = 8, block: int = 256,
                         scaling: str = "absmax", out: Tensor | None = None,
                         backend: str = "auto") -> Tensor:
    """Adds the dequantised payload into ``out`` (float32, zeros when None); returns it."""
    _check_int("numel", numel, 0, 2**62)
    check_bits(bits)
    _check_int("block", block, 1)
    check_choice("scaling", scaling, SCALINGS)
    _check_payload(payload, quant_nbytes(numel, bits, block, scaling), payload.device
                   if isinstance(payload, Tensor) else None)
    out = _check_out(out, numel, payload.device, "out")
    name = DISPATCH.select(backend, payload.device, torch.float32, block=block)
    _check_finite_scales(payload, -(-numel // block), 2 if scaling == "meanstd" else 1, "block",
                         decoding=True)
    call_op(quant_decode_op, payload, out, bits, block, scaling, name)
    return out
