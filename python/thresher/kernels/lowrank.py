"""Triton kernels of the fused low-rank Adam step (``thresher.ops.lowrank``, backend "triton").

Two launchers::

    lowrank_moments(r, m, v, rows, cols, row_stride, col_stride, b1, b2, bc1, bc2, eps, dsum)
    backproject_update(param, a, b, beta, alpha, grad=None, w=None, w_axis=0)

``lowrank_moments``: Adam's moments and the normalised update over the small projected
gradient in one pass; ``backproject_update``: the back-projection GEMM with the whole
parameter update in its epilogue. The maths, the traffic and the launch configurations:
docs/kernels.md ("Low-rank Adam step").
"""
from __future__ import annotations

import triton
import triton.language as tl

from .aot import compile_kernel, pointer_attrs, require_compiled

__all__ = ["lowrank_moments", "backproject_update", "aot_compile_stats", "SUPPORTED_DTYPES",
           "MOMENTS_CONFIG", "UPDATE_CONFIG"]

SUPPORTED_DTYPES = ("fp32", "bf16", "fp16")
MOMENTS_CONFIG = dict(BLOCK_R=4, BLOCK_C=128, num_warps=4)
UPDATE_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)


@triton.jit
def _moments_kernel(r_ptr, m_ptr, v_ptr, dsum_ptr, rows, cols, rs, cs, b1, b2, inv_bc1, inv_bc2,
                    eps, HAS_DSUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    c_off = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_off < cols
    r0 = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, rows, BLOCK_R):
        r_off = start + r0
        mask = (r_off[:, None] < rows) & c_mask[None, :]
        off = r_off[:, None].to(tl.int64) * rs + c_off[None, :].to(tl.int64) * cs
        r = tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
        m = b1 * m + (1.0 - b1) * r
        v = b2 * v + (1.0 - b2) * (r * r)
        vh = v * inv_bc2
        n = (m * inv_bc1) / (tl.sqrt(vh) + eps)
        tl.store(m_ptr + off, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + off, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(r_ptr + off, n.to(r_ptr.dtype.element_ty), mask=mask)
        if HAS_DSUM:
            acc += tl.sum(tl.where(mask, vh, 0.0), axis=0)
    if HAS_DSUM:
        tl.store(dsum_ptr + c_off, acc, mask=c_mask)


@triton.jit
def _backproject_update_kernel(p_ptr, a_ptr, b_ptr, g_ptr, w_ptr, M, N, K, sp, sam, sak, sbk,
                               sbn, sg, beta, alpha, W_AXIS: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = tl.arange(0, BLOCK_K)
    m_mask = om < M
    n_mask = on < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ok
        a = tl.load(a_ptr + om[:, None].to(tl.int64) * sam + kk[None, :] * sak,
                    mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * sbk + on[None, :].to(tl.int64) * sbn,
                    mask=(kk[:, None] < K) & n_mask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    mask = m_mask[:, None] & n_mask[None, :]
    p_off = om[:, None].to(tl.int64) * sp + on[None, :]
    p = tl.load(p_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
    out = beta * p + alpha * acc
    if W_AXIS >= 0:  # LoRDO's full-rank term: - grad * w (w per column: 0, per row: 1)
        g = tl.load(g_ptr + om[:, None].to(tl.int64) * sg + on[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if W_AXIS == 0:
            w = tl.load(w_ptr + on, mask=n_mask, other=0.0)
            out -= g * w[None, :]
        else:
            w = tl.load(w_ptr + om, mask=m_mask, other=0.0)
            out -= g * w[:, None]
    tl.store(p_ptr + p_off, out.to(p_ptr.dtype.element_ty), mask=mask)


def lowrank_moments(r, m, v, rows: int, cols: int, row_stride: int, col_stride: int, b1: float,
                    b2: float, bc1: float, bc2: float, eps: float, dsum=None) -> None:
    """See docs/kernels.md ("Low-rank Adam step"); ``dsum`` (cols,) fp32 or None."""
    if rows == 0 or cols == 0:
        if dsum is not None:
            dsum.zero_()
        return
    cfg = MOMENTS_CONFIG
    grid = (triton.cdiv(cols, cfg["BLOCK_C"]),)
    _moments_kernel[grid](r, m, v, dsum if dsum is not None else r, rows, cols, row_stride,
                          col_stride, float(b1), float(b2), float(1.0 / bc1), float(1.0 / bc2),
                          float(eps), HAS_DSUM=dsum is not None, BLOCK_R=cfg["BLOCK_R"],
                          BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])


def backproject_update(param, a, b, beta: float, alpha: float, grad=None, w=None,
                       w_axis: int = 0) -> None:
    """``param <- beta param + alpha (a @ b) [- grad * w]`` in one kernel (docs/kernels.md)."""
    M, N = param.shape
    K = a.shape[1]
    if param.stride(-1) != 1 or (grad is not None and grad.stride(-1) != 1):
        raise ValueError("backproject_update: param and grad need contiguous rows")
    if M == 0 or N == 0:
        return
    cfg = UPDATE_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    has_w = w is not None
    _backproject_update_kernel[grid](
        param, a, b, grad if has_w else param, w if has_w else param, M, N, K, param.stride(0),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), grad.stride(0) if has_w else 0,
        float(beta), float(alpha), W_AXIS=(w_axis if has_w else -1),
        IEEE=param.dtype.is_floating_point and param.element_size() == 4,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ----------------------------------------------------------------------------------------
# Ahead-of-time compilation (GPU readiness on machines without a GPU)
# ----------------------------------------------------------------------------------------


def _aot_specs(dtype: str):
    """(kernel name, fn, signature, constexprs, options) of every variant the launchers
    launch. Integer scalars below 2^31 are i32 (what the launcher infers), floats fp32."""
    p = f"*{dtype}"
    mom_sig = {"r_ptr": p, "m_ptr": p, "v_ptr": p, "dsum_ptr": "*fp32" , "rows": "i32",
               "cols": "i32", "rs": "i32", "cs": "i32", "b1": "fp32", "b2": "fp32",
               "inv_bc1": "fp32", "inv_bc2": "fp32", "eps": "fp32", "HAS_DSUM": "constexpr",
               "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    mc = MOMENTS_CONFIG
    for has in (False, True):
        sig = dict(mom_sig, dsum_ptr="*fp32" if has else p)
        yield ("moments_dsum" if has else "moments", _moments_kernel, sig,
               {"HAS_DSUM": has, "BLOCK_R": mc["BLOCK_R"], "BLOCK_C": mc["BLOCK_C"]},
               {"num_warps": mc["num_warps"]})
    uc = UPDATE_CONFIG
    up_sig = {"p_ptr": p, "a_ptr": p, "b_ptr": p, "g_ptr": p, "w_ptr": "*fp32", "M": "i32",
              "N": "i32", "K": "i32", "sp": "i32", "sam": "i32", "sak": "i32", "sbk": "i32",
              "sbn": "i32", "sg": "i32", "beta": "fp32", "alpha": "fp32",
              "W_AXIS": "constexpr", "IEEE": "constexpr", "BLOCK_M": "constexpr",
              "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    for w_axis in (-1, 0, 1):
        sig = dict(up_sig, w_ptr="*fp32" if w_axis >= 0 else p)
        yield (f"update_w{w_axis}" if w_axis >= 0 else "update", _backproject_update_kernel, sig,
               {"W_AXIS": w_axis, "IEEE": dtype == "fp32", "BLOCK_M": uc["BLOCK_M"],
                "BLOCK_N": uc["BLOCK_N"], "BLOCK_K": uc["BLOCK_K"]},
               {"num_warps": uc["num_warps"], "num_stages": uc["num_stages"]})


def aot_compile_stats(cc: int) -> list[dict]:
    """AOT-compiles every kernel variant x dtype for ``GPUTarget("cuda", cc, 32)``; one dict
    per compiled kernel: kernel, dtype, cc, num_warps, n_regs, n_spills (bytes), shared.
    Must run without ``TRITON_INTERPRET``."""
    require_compiled(_moments_kernel, "thresher.kernels.lowrank")
    out = []
    for dtype in SUPPORTED_DTYPES:
        for name, fn, sig, constexprs, options in _aot_specs(dtype):
            k, regs, st, ld = compile_kernel(fn, sig, constexprs, pointer_attrs(fn, sig), cc,
                                             options)
            out.append({"kernel": name, "dtype": dtype, "cc": int(cc),
                        "num_warps": k.metadata.num_warps, "n_regs": regs, "n_spills": st + ld,
                        "shared": k.metadata.shared})
    return out
