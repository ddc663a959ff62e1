"""The backends of the fused low-rank Adam step: each backend's moments pass and full-rank
update (reference = ops/_lowrank_reference.py, cpu = thresher._C, triton =
thresher.kernels.lowrank, cuda = thresher._C_cuda), the whole step around them
(``run_step``), the family's one dispatcher (``DISPATCH``) and the mutating custom op
``thresher::lowrank_adam_step`` (one opaque call to torch.compile). Called by ops/lowrank.py,
which checks every argument first. Backends, dtypes and memory traffic: docs/kernels.md
("Low-rank Adam step")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native
from ._dispatch import (
    BackendSpec,
    Dispatcher,
    extension_available,
    on_device,
    triton_available,
    triton_module,
)
from ._lowrank_reference import (
    FLOAT_DTYPES,
    acc_dtype,
    fullrank_weight,
    project_unchecked,
    reference_lowrank_adam_step,
    step_scalars,
)

__all__ = ["GPU_DTYPES", "CPU_DTYPES", "DISPATCH", "run_step", "lowrank_adam_step_op"]

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------
# The per-backend elementwise pieces
# ----------------------------------------------------------------------------------------


def _moment_view(R: Tensor, side: str) -> tuple[int, int, int, int]:
    """(rows = rank, cols, row_stride, col_stride) of a low-rank tensor: the kernels reduce
    over rows (the rank dimension) for LoRDO's D."""
    if side == "left":  # r x q
        return R.size(0), R.size(1), R.stride(0), R.stride(1)
    return R.size(1), R.size(0), R.stride(1), R.stride(0)  # p x r seen transposed


def _cpu_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    rows, cols, rs, cs = _moment_view(R, side)
    dsum = torch.empty(cols, dtype=R.dtype) if want_dsum else None
    _native.cpu_ext().lowrank_moments(
        R.data_ptr(), m.data_ptr(), v.data_ptr(), rows, cols, rs, cs,
        _native.DTYPE_CODES[R.dtype], b1, b2, bc1, bc2, eps, _native.ptr(dsum),
        _native.num_threads())
    return dsum


def _cpu_fullrank(param, grad, w, side):
    p, q = param.shape
    _native.cpu_ext().lowrank_fullrank_update(
        param.data_ptr(), grad.data_ptr(), w.data_ptr(), p, q, param.stride(0), grad.stride(0),
        _native.DTYPE_CODES[param.dtype], 0 if side == "left" else 1, _native.num_threads())


def _cuda_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    rows, cols, rs, cs = _moment_view(R, side)
    dsum = torch.empty(cols, dtype=torch.float32, device=R.device) if want_dsum else None
    _native.cuda_ext().lowrank_moments(
        R.data_ptr(), m.data_ptr(), v.data_ptr(), rows, cols, rs, cs,
        _native.DTYPE_CODES[R.dtype], b1, b2, bc1, bc2, eps, _native.ptr(dsum),
        _native.cuda_stream(R))
    return dsum


def _cuda_fullrank(param, grad, w, side):
    # w: float32, contiguous (the caller keeps it alive until the asynchronous kernel ran:
    # it is freed to the caching allocator, whose reuse is ordered on this stream)
    p, q = param.shape
    _native.cuda_ext().lowrank_fullrank_update(
        param.data_ptr(), grad.data_ptr(), w.data_ptr(), p, q,
        param.stride(0), grad.stride(0), _native.DTYPE_CODES[param.dtype],
        0 if side == "left" else 1, _native.cuda_stream(param))


def _triton_module():
    return triton_module("lowrank")


def _triton_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    rows, cols, rs, cs = _moment_view(R, side)
    dsum = torch.empty(cols, dtype=torch.float32, device=R.device) if want_dsum else None
    with on_device(R):
        _triton_module().lowrank_moments(R, m, v, rows, cols, rs, cs, b1, b2, bc1, bc2, eps, dsum)
    return dsum


_MOMENTS = {"cpu": _cpu_moments, "cuda": _cuda_moments, "triton": _triton_moments}


def run_step(backend, param, grad, Q, m, v, side, step, lr, b1, b2, eps, wd, scale, error,
             omega, mu):
    """The whole step on one backend (inputs validated by ``lowrank_adam_step``; ``side``
    resolved). The fused backends: GEMM 1, one moments pass over R (which becomes N), GEMM 2
    with the update in its epilogue [+ the full-rank pass]; no full-size temporary."""
    if backend == "reference":
        reference_lowrank_adam_step(param, grad, Q, m, v, side=side, step=step, lr=lr,
                                    beta1=b1, beta2=b2, eps=eps, weight_decay=wd, scale=scale,
                                    error=error, omega=omega, mu=mu)
        return
    s = step_scalars(step, lr, b1, b2, wd, scale, error is not None, omega, mu)
    # -- projection (GEMM 1), with LoRDO's error feedback -----------------------------------
    A = grad
    if error is not None:
        error.add_(grad)  # E <- G + E: the tensor to project
        A = error
    R = project_unchecked(A, Q, side).contiguous()  # transient r x q (or p x r) workspace
    if error is not None:  # E <- A - project_back(R): in place, no full-size temporary
        if side == "left":
            error.addmm_(Q, R, alpha=-1.0)
        else:
            error.addmm_(R, Q.T, alpha=-1.0)
    # -- moments + normalised direction (one pass over R; R becomes N) ----------------------
    dsum = _MOMENTS[backend](R, m, v, side, b1, b2, s.bc1, s.bc2, eps, s.fullrank is not None)
    N = R
    # -- parameter update: GEMM 2 with the update in its epilogue [+ full-rank term] ---------
    w = None
    if s.fullrank is not None:
        w = fullrank_weight(dsum, Q.size(1), eps, s.fullrank, acc_dtype(param.dtype))
    if backend == "triton":
        a, b = (Q, N) if side == "left" else (N, Q.T)
        with on_device(param):
            _triton_module().backproject_update(param, a, b, s.beta, s.alpha,
                                                grad if w is not None else None,
                                                None if w is None else w.float().contiguous(),
                                                0 if side == "left" else 1)
        return
    if s.alpha != 0.0:
        if side == "left":
            param.addmm_(Q, N, beta=s.beta, alpha=s.alpha)
        else:
            param.addmm_(N, Q.T, beta=s.beta, alpha=s.alpha)
    elif s.beta != 1.0:
        param.mul_(s.beta)
    if w is not None:  # w is in the accumulation dtype: param's on the CPU, float32 on CUDA
        (_cpu_fullrank if backend == "cpu" else _cuda_fullrank)(param, grad, w.contiguous(), side)


# ----------------------------------------------------------------------------------------
# Dispatcher and custom op
# ----------------------------------------------------------------------------------------


def _layout_limit(row_contiguous: bool = True, **_) -> str | None:
    return None if row_contiguous else (
        "the parameter, gradient and error need contiguous rows (stride(-1) == 1) to be "
        "updated in place by a kernel")


DISPATCH = Dispatcher(
    "lowrank_adam_step",
    [
        BackendSpec("triton", ("cuda",), GPU_DTYPES, triton_available("lowrank"), _layout_limit),
        BackendSpec("cuda", ("cuda",), GPU_DTYPES, extension_available("_C_cuda", "lowrank_moments"),
                    _layout_limit),
        BackendSpec("cpu", ("cpu",), CPU_DTYPES, extension_available("_C", "lowrank_moments"),
                    _layout_limit, on_skip=lambda: _native.warn_missing_once("_C")),
        BackendSpec("reference", ("cpu", "cuda"), FLOAT_DTYPES),
    ],
)


@torch.library.custom_op("thresher::lowrank_adam_step",
                         mutates_args=("param", "exp_avg", "exp_avg_sq", "error"))
def lowrank_adam_step_op(param: Tensor, grad: Tensor, Q: Tensor, exp_avg: Tensor,
                         exp_avg_sq: Tensor, error: Optional[Tensor], side: str, step: int,
                         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         scale: float, omega: float, mu: float, backend: str) -> None:
    run_step(backend, param, grad, Q, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps,
             weight_decay, scale, error, omega, mu)


@lowrank_adam_step_op.register_fake
def _(param, grad, Q, exp_avg, exp_avg_sq, error, side, step, lr, beta1, beta2, eps,
      weight_decay, scale, omega, mu, backend):
    return None
