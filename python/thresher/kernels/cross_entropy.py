"""Triton kernels for the weighted cross-entropy op (``thresher.ops.cross_entropy``).

The op layer calls two launchers, one row kernel each::

    ce_forward(x, target, lse, loss, grad, coef, ignore_index, eps, zl, cap)  # loss, lse [, grad]
    ce_backward(x, target, lse, coef, grad, ignore_index, eps, zl, cap)       # grad from saved lse

One program per row, swept in ``BLOCK_V`` tiles, fp32 maths whatever the storage dtype: an
online log-sum-exp (one ``exp`` per element), a second pass for the gradient, which may be
written over ``x`` itself. The maths, the design, the bytes moved and why the in-place
gradient is safe: docs/kernels.md ("Cross-entropy", "Triton kernels").
"""
from __future__ import annotations

import triton
import triton.language as tl

from .aot import compile_kernel, pointer_attrs, require_compiled

__all__ = ["ce_forward", "ce_backward", "launch_config", "aot_compile_stats", "SUPPORTED_DTYPES"]

# ----------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------
#
# Large vocabularies (every LM: 32000, 50257, 128256, ...) use 4096-element tiles on 16
# warps (512 threads): 8 elements a thread, i.e. one 16-byte load per thread per tile for
# bf16/fp16 and two for fp32, so a tile puts 8 KB (16-bit) / 16 KB (fp32) in flight per
# program. The loop-carried state is one 8-element fp32 vector (sum-exp) plus scalars: <= 40
# registers a thread on sm_80 and sm_90, no spills, for every dtype and both row alignments
# (the AOT test checks; aot_compile_stats reports them). So 3 programs (1536 threads, 48 of
# 64 warps) fit an SM's 64K registers and hide each other's reductions, with 24 KB (16-bit)
# / 48 KB (fp32) of loads in flight per SM -- Little's law asks about 3.35 TB/s / 132 SMs x
# ~1 us latency ~ 25 KB on an H100. (16 elements a thread on 8 warps needed 55-64 registers
# and spilled on sm_80 for odd V, where ptxas aims at 64 and the loads are scalar.)
# V = 128256 takes 32 tiles (the masked tail idles ~2% of lanes), 50257 takes 13 (~6%).
# Small vocabularies (V <= 1024: classifiers, tests) use one 1024-element tile on 4 warps:
# one pass of the loop, 8 elements a thread. Only these two configurations exist, so the
# AOT test compiles exactly what the launchers run.
LARGE_BLOCK_V, LARGE_NUM_WARPS = 4096, 16
SMALL_BLOCK_V, SMALL_NUM_WARPS = 1024, 4
CONFIGS = ((SMALL_BLOCK_V, SMALL_NUM_WARPS), (LARGE_BLOCK_V, LARGE_NUM_WARPS))


def launch_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` the launchers use for a vocabulary of ``vocab``."""
    return (SMALL_BLOCK_V, SMALL_NUM_WARPS) if vocab <= SMALL_BLOCK_V \
        else (LARGE_BLOCK_V, LARGE_NUM_WARPS)


# Storage dtypes the kernels accept (fp32 maths for all of them). Names are Triton's.
SUPPORTED_DTYPES = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh in fp32: an odd polynomial for |x| < 0.625 (Cephes tanhf; the exp form cancels
    there), else sign(x) (1 - 2 / (exp(2|x|) + 1)) (exp overflow to inf gives +-1)."""
    a = tl.abs(x)
    s = x * x
    small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s
              + 1.33314422036e-1) * s - 3.33332819422e-1) * s * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def _load_row(ptrs, mask, other, cap, SOFTCAP: tl.constexpr):
    """Loads logits as fp32, soft-capped (cap tanh(x / cap)) when SOFTCAP."""
    x = tl.load(ptrs, mask=mask, other=other).to(tl.float32)
    if SOFTCAP:  # masked lanes keep ``other`` (-inf must not become -cap)
        x = tl.where(mask, cap * _tanh(x / cap), other)
    return x


@triton.jit
def _write_grad_row(x_row, g_row, V, y, lse, c, eps, zl, cap, BLOCK_V: tl.constexpr,
                    SOFTCAP: tl.constexpr):
    """grad_j = c (exp(x_j - lse)(1 + 2 zl lse) - eps/V - (1-eps)[j == y]); zeros, without
    reading x, when c == 0 (ignored row or zero weight). Reads each tile before writing
    it, so g_row may equal x_row."""
    cols0 = tl.arange(0, BLOCK_V)
    if c == 0.0:
        zero = tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            tl.store(g_row + cols, zero, mask=cols < V)
    else:
        scale = c * (1.0 + 2.0 * zl * lse)  # c * d(lse + zl lse^2)/d lse
        off = c * eps / V                    # smoothing: c * eps * d(mean x)/dx_j
        hot = c * (1.0 - eps)                # the target column's extra term
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            xb = _load_row(x_row + cols, mask, 0.0, cap, SOFTCAP)
            g = tl.exp(xb - lse) * scale - off
            g = tl.where(cols == y, g - hot, g)
            if SOFTCAP:
                t = xb / cap
                g = g * (1.0 - t * t)
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    x_ptr, x_stride, tgt_ptr, lse_ptr, loss_ptr, grad_ptr, grad_stride, coef_ptr,
    V, ignore_index, eps, zl, cap,
    BLOCK_V: tl.constexpr, HAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # int64 row offsets: N * V passes 2^31 elements (16384 x 128256) long before V does.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    y = tl.load(tgt_ptr + row)
    valid = y != ignore_index
    lse = tl.full([], 0.0, tl.float32)
    if valid:
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), tl.float32)        # running max (block-uniform)
        sx = tl.full([], 0.0, tl.float32)                 # running sum of x (smoothing)
        s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)     # per-lane sum exp(x - m)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            xb = _load_row(x_row + cols, mask, float("-inf"), cap, SOFTCAP)
            m_new = tl.maximum(m, tl.max(xb, axis=0))
            # A row (so far) of -inf logits must not produce exp(-inf - -inf) = NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_vec = s_vec * tl.exp(m - m_ref) + tl.exp(xb - m_ref)
            sx += tl.sum(tl.where(mask, xb, 0.0), axis=0)
            m = m_new
        # x_y is loaded after the sweep (not live across it: the soft-capped small-vocab
        # kernel would spill on sm_80) but before the block reduction below, whose barrier
        # orders it before any in-place gradient store. A target outside [0, V) (only where
        # the op's checks are skipped, inside a torch.compile graph) is never read: NaN
        # loss, no target term in the gradient.
        y_ok = (y >= 0) & (y < V)
        x_y = _load_row(x_row + tl.where(y_ok, y, 0), y_ok, float("nan"), cap, SOFTCAP)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        lse = m_ref + tl.log(tl.sum(s_vec, axis=0))
        # eps * mean(x) only when smoothing: with eps = 0 a -inf logit must not make 0 * -inf.
        smooth = tl.where(eps != 0.0, eps * (sx / V), 0.0)
        loss = lse - (1.0 - eps) * x_y - smooth + zl * lse * lse
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, loss)
    else:
        tl.store(lse_ptr + row, 0.0)
        tl.store(loss_ptr + row, 0.0)
    if HAS_GRAD:
        c = tl.load(coef_ptr + row)
        c = tl.where(valid, c, 0.0)
        _write_grad_row(x_row, grad_ptr + row * grad_stride, V, y, lse, c, eps, zl, cap, BLOCK_V,
                        SOFTCAP)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, x_stride, tgt_ptr, lse_ptr, coef_ptr, grad_ptr, grad_stride,
    V, ignore_index, eps, zl, cap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(tgt_ptr + row)
    c = tl.load(coef_ptr + row)
    c = tl.where(y != ignore_index, c, 0.0)
    lse = tl.load(lse_ptr + row)
    _write_grad_row(x_ptr + row * x_stride, grad_ptr + row * grad_stride, V, y, lse, c, eps, zl,
                    cap, BLOCK_V, SOFTCAP)


# ----------------------------------------------------------------------------------------
# Launchers (the op layer validated shapes, dtypes and devices; these only check layout)
# ----------------------------------------------------------------------------------------


def _check_rows(name, t, n, v):
    if t.dim() != 2 or tuple(t.shape) != (n, v) or (v > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be ({n}, {v}) with a unit last stride, got shape "
                         f"{tuple(t.shape)} strides {tuple(t.stride())}")


def ce_forward(x, target, lse, loss, grad, coef, ignore_index: int, eps: float, zl: float,
               cap: float = 0.0) -> None:
    """Writes ``lse`` and ``loss`` (N,) fp32 and, when ``grad`` is given, ``coef_t * dl_t/dx``
    into ``grad`` (may be ``x`` itself)."""
    n, v = x.shape
    _check_rows("x", x, n, v)
    if grad is not None:
        _check_rows("grad", grad, n, v)
        if coef is None:
            raise ValueError("ce_forward: coef is required when grad is given")
    if n == 0:
        return
    block_v, num_warps = launch_config(v)
    has_grad = grad is not None
    _ce_fwd_kernel[(n,)](
        x, x.stride(0), target, lse, loss,
        grad if has_grad else x, grad.stride(0) if has_grad else 0,
        coef if has_grad else lse,  # unused placeholders when there is no gradient
        v, int(ignore_index), float(eps), float(zl), float(cap),
        BLOCK_V=block_v, HAS_GRAD=has_grad, SOFTCAP=bool(cap), num_warps=num_warps,
    )


def ce_backward(x, target, lse, coef, grad, ignore_index: int, eps: float, zl: float,
                cap: float = 0.0) -> None:
    """Writes ``coef_t * dl_t/dx`` into ``grad`` (may be ``x`` itself) from the saved ``lse``."""
    n, v = x.shape
    _check_rows("x", x, n, v)
    _check_rows("grad", grad, n, v)
    if n == 0:
        return
    block_v, num_warps = launch_config(v)
    _ce_bwd_kernel[(n,)](
        x, x.stride(0), target, lse, coef, grad, grad.stride(0),
        v, int(ignore_index), float(eps), float(zl), float(cap),
        BLOCK_V=block_v, SOFTCAP=bool(cap), num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------
# Ahead-of-time compilation (GPU readiness on machines without a GPU)
# ----------------------------------------------------------------------------------------


def _aot_specs(dtype: str):
    """(kernel name, fn, signature, constexprs, block_v, num_warps) for every variant the
    launchers launch. Scalar types are what Triton's launcher infers from the Python values:
    row strides and V below 2^31 are i32, eps/zl fp32."""
    p = f"*{dtype}"
    fwd_sig = {"x_ptr": p, "x_stride": "i32", "tgt_ptr": "*i64", "lse_ptr": "*fp32",
               "loss_ptr": "*fp32", "grad_ptr": p, "grad_stride": "i32", "coef_ptr": "*fp32",
               "V": "i32", "ignore_index": "i32", "eps": "fp32", "zl": "fp32", "cap": "fp32",
               "BLOCK_V": "constexpr", "HAS_GRAD": "constexpr", "SOFTCAP": "constexpr"}
    bwd_sig = {"x_ptr": p, "x_stride": "i32", "tgt_ptr": "*i64", "lse_ptr": "*fp32",
               "coef_ptr": "*fp32", "grad_ptr": p, "grad_stride": "i32",
               "V": "i32", "ignore_index": "i32", "eps": "fp32", "zl": "fp32", "cap": "fp32",
               "BLOCK_V": "constexpr", "SOFTCAP": "constexpr"}
    for block_v, num_warps in CONFIGS:
        for cap in (False, True):
            sfx = "_softcap" if cap else ""
            for has_grad in (False, True):
                yield (("ce_fwd_grad" if has_grad else "ce_fwd") + sfx, _ce_fwd_kernel, fwd_sig,
                       {"BLOCK_V": block_v, "HAS_GRAD": has_grad, "SOFTCAP": cap}, block_v,
                       num_warps)
            yield ("ce_bwd" + sfx, _ce_bwd_kernel, bwd_sig, {"BLOCK_V": block_v, "SOFTCAP": cap},
                   block_v, num_warps)


# The JIT's specialisation: torch allocations are 16-byte aligned, so every pointer is
# 16-divisible; V and the row strides are too when V is a multiple of 16 (32000, 128256),
# which lets the compiler vectorise row loads (16-byte ld.global.v4). An odd V (50257) gets
# the same kernel with those hints off: scalar 2/4-byte loads, still coalesced. (The JIT hints
# V and each stride separately, so a padded buffer can mix the two; these are the two
# extremes.)
_ALIGNED_ROW_ARGS = ("x_stride", "grad_stride", "V")


def aot_compile_stats(cc: int) -> list[dict]:
    """AOT-compiles every kernel of this file, for every supported dtype and every launch
    configuration the launchers use, for ``GPUTarget("cuda", cc, 32)`` (cc = 80 or 90); no
    GPU needed (Triton ships ptxas). Returns one dict per compiled kernel: kernel ("ce_fwd"
    and "ce_fwd_grad": _ce_fwd_kernel with HAS_GRAD False/True; "ce_bwd"), dtype,
    cc, block_v, aligned (row-alignment specialisation, see _ALIGNED_ROW_ARGS), num_warps,
    n_regs, n_spills (spill store + load bytes), shared (bytes). Each kernel also has a
    ``_softcap`` variant (SOFTCAP=True).

    Must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions)."""
    require_compiled(_ce_fwd_kernel, "thresher.kernels.cross_entropy")
    out = []
    for dtype in SUPPORTED_DTYPES:
        for name, fn, sig, constexprs, block_v, num_warps in _aot_specs(dtype):
            for aligned in (True, False):
                attrs = pointer_attrs(fn, sig, _ALIGNED_ROW_ARGS if aligned else ())
                k, regs, spill_st, spill_ld = compile_kernel(fn, sig, constexprs, attrs, cc,
                                                             {"num_warps": num_warps})
                # Triton fills these only once the kernel is loaded on a GPU; use them then.
                n_regs = getattr(k, "n_regs", None)
                n_spills = getattr(k, "n_spills", None)
                out.append({
                    "kernel": name, "dtype": dtype, "cc": int(cc), "block_v": block_v,
                    "aligned": aligned, "num_warps": k.metadata.num_warps,
                    "n_regs": n_regs if n_regs is not None else regs,
                    "n_spills": n_spills if n_spills is not None else spill_st + spill_ld,
                    "shared": k.metadata.shared,
                })
    return out
