"""Low-rank gradient projection and the fused low-rank Adam step (GaLore, LoRDO):
``choose_side``, ``project``, ``project_back``, ``refresh_projection`` and
``lowrank_adam_step`` (exported from ``thresher.ops``), with every argument check.

The op is split by job: this module (public API and checks), ``_lowrank_backends`` (the
backends, the one dispatcher ``DISPATCH``, the custom op) and ``_lowrank_reference`` (the
PyTorch maths: projection, the basis refresh, ``reference_lowrank_adam_step``). The sides,
the step, LoRDO's full-rank term, the memory traffic and the backends: docs/kernels.md
("Low-rank Adam step"); signatures: docs/interfaces.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from thresher.core.checks import check_choice, check_finite_range, check_has_data, check_tensor

from ._lowrank_backends import DISPATCH, lowrank_adam_step_op, run_step
from ._lowrank_reference import (
    FLOAT_DTYPES,
    project_back_unchecked,
    project_unchecked,
    reference_lowrank_adam_step,
    refresh_basis,
)

__all__ = [
    "choose_side",
    "project",
    "project_back",
    "refresh_projection",
    "lowrank_adam_step",
    "reference_lowrank_adam_step",
    "SIDES",
    "METHODS",
]

SIDES = ("left", "right")
METHODS = ("svd", "power", "random")


def choose_side(shape) -> str:
    """GaLore's rule (galore_torch ``proj_type="std"``): p >= q -> "right" (``R = G Q``),
    else "left" (``R = Q^T G``): the basis spans the smaller dimension."""
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"shape must be a 2-D shape (p, q), got {shape}")
    return "right" if shape[0] >= shape[1] else "left"


def _resolve_side(side: str, shape) -> str:
    check_choice("side", side, SIDES + ("auto",))
    return choose_side(shape) if side == "auto" else side


def _basis_dim(shape, side: str) -> int:
    return shape[0] if side == "left" else shape[1]


def _lowrank_shape(shape, rank: int, side: str) -> tuple[int, int]:
    return (rank, shape[1]) if side == "left" else (shape[0], rank)


def project(grad: Tensor, Q: Tensor, side: str) -> Tensor:
    """``Q^T G`` (side "left", Q: p x r -> r x q) or ``G Q`` (side "right", Q: q x r -> p x r)."""
    check_tensor("grad", grad, ndim=2, dtypes=FLOAT_DTYPES)
    side = _resolve_side(side, tuple(grad.shape))
    check_tensor("Q", Q, ndim=2, dtypes=(grad.dtype,), device=grad.device,
                 shape=(_basis_dim(grad.shape, side), None))
    return project_unchecked(grad, Q, side)


def project_back(R: Tensor, Q: Tensor, side: str) -> Tensor:
    """The inverse map of :func:`project`: ``Q R`` (side "left") or ``R Q^T`` ("right")."""
    check_choice("side", side, SIDES)
    check_tensor("R", R, ndim=2, dtypes=FLOAT_DTYPES)
    r = R.size(0) if side == "left" else R.size(1)
    check_tensor("Q", Q, ndim=2, dtypes=(R.dtype,), device=R.device, shape=(None, r))
    return project_back_unchecked(R, Q, side)


def refresh_projection(matrix: Tensor, rank: int, *, side: str = "auto", method: str = "power",
                       prev: Tensor | None = None, seed: int = 0, niter: int | None = None,
                       oversample: int | None = None) -> Tensor:
    """An orthonormal basis Q (``dim x rank``, dim = p for side "left", q for "right") of the
    top-``rank`` singular subspace of ``matrix`` on that side, in ``matrix``'s dtype.
    ``method``: "svd" (exact), "random" (randomised SVD from ``seed``: ``oversample`` extra
    columns, default ``max(8, rank // 8)``; ``niter`` power iterations, default 2) or "power"
    (the default: ``niter`` power iterations, default 1, warm-started from ``prev``, the
    previous basis; "random" without it). Deterministic: the same inputs and seed give the
    same Q on every rank (given the same BLAS thread count). Work is in float32 for
    bf16/fp16 inputs. The methods and their costs: docs/kernels.md ("Basis refresh")."""
    check_tensor("matrix", matrix, ndim=2, dtypes=FLOAT_DTYPES)
    check_has_data("matrix", matrix)
    check_choice("method", method, METHODS)
    side = _resolve_side(side, tuple(matrix.shape))
    p, q = matrix.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(p, q):
        raise ValueError(f"rank must be an int in [1, min(p, q) = {min(p, q)}] for a matrix of "
                         f"shape {(p, q)}, got {rank!r}")
    for name, val, lo in (("seed", seed, None), ("oversample", oversample, 0),
                          ("niter", niter, 0)):
        if val is None and name != "seed":
            continue
        if not isinstance(val, int) or isinstance(val, bool) or (lo is not None and val < lo):
            raise ValueError(f"{name} must be an int{'' if lo is None else f' >= {lo}'}, got {val!r}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("matrix must be finite (it has NaN or Inf entries)")
    if prev is not None:
        check_tensor("prev", prev, ndim=2, device=matrix.device,
                     shape=(_basis_dim(matrix.shape, side), rank), dtypes=FLOAT_DTYPES)
    return refresh_basis(matrix, rank, side, method, prev, seed, niter, oversample)


def _row_contiguous(*ts) -> bool:
    return all(t is None or t.numel() == 0 or t.stride(-1) == 1 for t in ts)


@torch.no_grad()
def lowrank_adam_step(param: Tensor, grad: Tensor, Q: Tensor, exp_avg: Tensor,
                      exp_avg_sq: Tensor, *, side: str, step, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float = 0.0, scale: float = 1.0,
                      error: Tensor | None = None, omega: float = 0.0, mu: float = 1.0,
                      backend: str = "auto") -> None:
    """One fused low-rank Adam step, in place on ``param``, ``exp_avg``, ``exp_avg_sq``
    (shaped like the projected gradient: ``(r, q)`` for side "left", ``(p, r)`` for "right")
    and ``error`` (LoRDO's full-size error-feedback buffer, or None for GaLore's step).
    ``step`` is the 1-based step count after this update (int or a 0-d tensor). The maths,
    the axes of LoRDO's D and the memory traffic: docs/kernels.md ("Low-rank Adam step").
    Gradient clipping is the caller's (pass the clipped gradient)."""
    check_tensor("param", param, ndim=2, dtypes=FLOAT_DTYPES)
    check_has_data("param", param)  # the others must be on param's device
    p, q = param.shape
    dev, dt = param.device, param.dtype
    check_tensor("grad", grad, dtypes=(dt,), device=dev, shape=(p, q))
    side = _resolve_side(side, (p, q))
    check_tensor("Q", Q, ndim=2, dtypes=(dt,), device=dev, shape=(_basis_dim((p, q), side), None))
    rank = Q.size(1)
    if not 1 <= rank <= min(p, q):
        raise ValueError(f"Q must have between 1 and min(p, q) = {min(p, q)} columns (the rank) "
                         f"for a parameter of shape {(p, q)}, got shape {tuple(Q.shape)}")
    low = _lowrank_shape((p, q), rank, side)
    check_tensor("exp_avg", exp_avg, dtypes=(dt,), device=dev, shape=low)
    check_tensor("exp_avg_sq", exp_avg_sq, dtypes=(dt,), device=dev, shape=low)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (optimizer state), got strides {t.stride()}")
    if error is not None:
        check_tensor("error", error, dtypes=(dt,), device=dev, shape=(p, q))
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(f"step must be an int or a 1-element tensor, got shape {tuple(step.shape)}")
        check_has_data("step", step)
        step = int(step.item())
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the count including this update), got {step!r}")
    lr = check_finite_range("lr", lr, 0.0)
    beta1 = check_finite_range("beta1", beta1, 0.0, 1.0, hi_open=True)
    beta2 = check_finite_range("beta2", beta2, 0.0, 1.0, hi_open=True)
    eps = check_finite_range("eps", eps, 0.0)
    weight_decay = check_finite_range("weight_decay", weight_decay, 0.0)
    scale = check_finite_range("scale", scale)
    omega = check_finite_range("omega", omega, 0.0, 1.0)
    mu = check_finite_range("mu", mu, 0.0, lo_open=True)
    if error is None and omega != 0.0:
        raise ValueError(
            f"omega={omega} weights LoRDO's full-rank term, which needs the error-feedback "
            "buffer: pass error=<tensor shaped like param> (or omega=0 for GaLore's step)")
    name = DISPATCH.select(backend, dev, dt, row_contiguous=_row_contiguous(param, grad, error))
    if torch.compiler.is_compiling():
        lowrank_adam_step_op(param, grad, Q, exp_avg, exp_avg_sq, error, side, step, lr, beta1,
                             beta2, eps, weight_decay, scale, omega, mu, name)
    else:  # eager: skip the custom-op dispatch overhead (~20 us a call, per parameter)
        run_step(name, param, grad, Q, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps,
                 weight_decay, scale, error, omega, mu)
