"""The low-rank family's PyTorch maths, without argument checks: projection and
back-projection, the basis refresh (its only implementation: every backend uses it) and the
reference low-rank Adam step, the ground every fused backend is tested against. Called by
ops/lowrank.py (which checks every argument) and ops/_lowrank_backends.py. The maths:
docs/kernels.md ("Low-rank Adam step")."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "acc_dtype",
    "project_unchecked",
    "project_back_unchecked",
    "refresh_basis",
    "StepScalars",
    "step_scalars",
    "fullrank_weight",
    "reference_moments",
    "reference_lowrank_adam_step",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step computes in: float64 for float64 parameters, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def project_unchecked(G: Tensor, Q: Tensor, side: str) -> Tensor:
    """``Q^T G`` (side "left") or ``G Q`` (side "right")."""
    return Q.T @ G if side == "left" else G @ Q


def project_back_unchecked(R: Tensor, Q: Tensor, side: str) -> Tensor:
    """``Q R`` (side "left") or ``R Q^T`` (side "right")."""
    return Q @ R if side == "left" else R @ Q.T


# ----------------------------------------------------------------------------------------
# Basis refresh
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lapack_threads(t: Tensor):
    """One intra-op thread around the thin/small LAPACK factorisations (QR, eigh, svd) on the
    CPU: on shared cores every parallel region waits for a descheduled partner thread
    (measurements: docs/kernels.md, "Basis refresh"). set_num_threads is process-wide: other
    Python threads running torch ops at the same moment run single-threaded too."""
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _orthonormalise(Y: Tensor) -> Tensor:
    """Q of the thin QR of Y with the signs fixed so that diag(R) >= 0: the basis then varies
    continuously with Y (a warm-started power iteration keeps its columns' order and signs)."""
    with _lapack_threads(Y):
        Qm, Rm = torch.linalg.qr(Y)
    signs = torch.sign(torch.diagonal(Rm))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Qm * signs


def _gaussian(rows: int, cols: int, seed: int, dtype, device) -> Tensor:
    # Drawn on the CPU from a seeded generator, then moved: the same sketch on every device
    # and every rank.
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def refresh_basis(matrix: Tensor, rank: int, side: str, method: str, prev: Tensor | None,
                  seed: int, niter: int | None, oversample: int | None) -> Tensor:
    """``refresh_projection``'s maths (``side`` resolved to "left"/"right"); the methods and
    their defaults: docs/kernels.md ("Basis refresh")."""
    work = torch.float32 if matrix.dtype in (torch.bfloat16, torch.float16) else matrix.dtype
    dim = matrix.shape[0] if side == "left" else matrix.shape[1]
    if method == "power" and prev is None:
        method = "random"

    if method == "svd":
        with _lapack_threads(matrix):
            U, _, Vh = torch.linalg.svd(matrix.to(work), full_matrices=False)
        Q = U[:, :rank] if side == "left" else Vh[:rank].T
        return Q.contiguous().to(matrix.dtype)

    M = matrix.to(work)
    Mt = M.T
    if side == "right":  # the subspace of M's columns' space on the right = left of M^T
        M, Mt = Mt, M
    # M: dim x n; we want its top-rank left singular vectors.
    if method == "power":
        Q = prev.to(work)
        for _ in range(1 if niter is None else niter):
            Q = _orthonormalise(M @ (Mt @ Q))
        return Q.contiguous().to(matrix.dtype)

    n = M.size(1)
    k = min(rank + (max(8, rank // 8) if oversample is None else oversample), dim, n)
    Y = _orthonormalise(M @ _gaussian(n, k, seed, work, M.device))
    for _ in range(2 if niter is None else niter):
        Y = _orthonormalise(M @ (Mt @ Y))
    # Rayleigh-Ritz: the top-rank eigenvectors of B B^T (B = Y^T M, k x n) rotate Y onto
    # the best rank-r subspace of span(Y). eigh of the k x k Gram matrix in float64 instead
    # of svd(B): the same vectors, faster, and float64 keeps the small eigenvalues (sigma^2)
    # resolved.
    B = Y.T @ M
    with _lapack_threads(B):
        _, vecs = torch.linalg.eigh((B @ B.T).double())
    Q = Y @ vecs[:, -rank:].flip(-1).to(work)
    return Q.contiguous().to(matrix.dtype)


# ----------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------


class StepScalars(NamedTuple):
    """The scalars of one step: the bias corrections, the parameter update
    ``W <- beta W + alpha project_back(N)`` and LoRDO's full-rank coefficient
    ``lr (1 - omega) / mu`` (None when that term is off: GaLore mode, or omega = 1)."""

    bc1: float
    bc2: float
    beta: float
    alpha: float
    fullrank: float | None


def step_scalars(step, lr, beta1, beta2, weight_decay, scale, lordo, omega, mu) -> StepScalars:
    return StepScalars(
        1.0 - beta1 ** step, 1.0 - beta2 ** step, 1.0 - lr * weight_decay,
        -lr * scale * (omega if lordo else 1.0),
        lr * (1.0 - omega) / mu if lordo and omega < 1.0 else None)


def fullrank_weight(dsum: Tensor, rank: int, eps: float, coef: float, acc) -> Tensor:
    """LoRDO's full-rank weight ``coef / (D + eps)``, ``D = sqrt(dsum / rank)`` (the RMS of
    ``sqrt(v_hat)`` along the rank axis, from the moments pass's column sums)."""
    return coef / ((dsum.to(acc) / rank).sqrt() + eps)


def reference_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    """Adam's moments on R and the normalised direction written over R; with ``want_dsum``
    the sums of ``v_hat`` over the rank dimension (LoRDO's D)."""
    acc = acc_dtype(R.dtype)
    r, mf, vf = R.to(acc), m.to(acc), v.to(acc)
    mf = b1 * mf + (1 - b1) * r
    vf = b2 * vf + (1 - b2) * r * r
    vhat = vf / bc2
    n = (mf / bc1) / (vhat.sqrt() + eps)
    m.copy_(mf)
    v.copy_(vf)
    R.copy_(n)
    if not want_dsum:
        return None
    return vhat.sum(0 if side == "left" else 1)


def reference_lowrank_adam_step(param, grad, Q, exp_avg, exp_avg_sq, *, side, step, lr, beta1,
                                beta2, eps, weight_decay=0.0, scale=1.0, error=None, omega=0.0,
                                mu=1.0):
    """The reference backend (plain PyTorch in float32, float64 for float64 inputs): the
    ground every other backend is tested against. Same contract as ``lowrank_adam_step``,
    without its checks."""
    with torch.no_grad():
        s = step_scalars(int(step), lr, beta1, beta2, weight_decay, scale, error is not None,
                         omega, mu)
        acc = acc_dtype(param.dtype)
        Qa = Q.to(acc)
        A = grad
        if error is not None:
            error.add_(grad)  # E <- G + E: the tensor to project
            A = error
        R = project_unchecked(A.to(acc), Qa, side)
        if error is not None:
            error.copy_(A.to(acc) - project_back_unchecked(R, Qa, side))
        dsum = reference_moments(R, exp_avg, exp_avg_sq, side, beta1, beta2, s.bc1, s.bc2, eps,
                                 s.fullrank is not None)
        upd = param.to(acc) * s.beta + s.alpha * project_back_unchecked(R, Qa, side)
        if s.fullrank is not None:
            w = fullrank_weight(dsum, Q.size(1), eps, s.fullrank, acc)
            upd = upd - grad.to(acc) * (w[None, :] if side == "left" else w[:, None])
        param.copy_(upd)
