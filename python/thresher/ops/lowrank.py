"""Low-rank gradient projection and the fused low-rank Adam step (GaLore, LoRDO).

Public API (``from thresher.ops.lowrank import ...``)::

    choose_side(shape) -> "left" | "right"
    project(grad, Q, side) -> R
    project_back(R, Q, side) -> G_hat
    refresh_projection(matrix, rank, *, side="auto", method="power"|"random"|"svd", prev=None,
                       seed=0, niter=None, oversample=None) -> Q
    lowrank_adam_step(param, grad, Q, exp_avg, exp_avg_sq, *, side, step, lr, beta1, beta2, eps,
                      weight_decay=0.0, scale=1.0, error=None, omega=0.0, mu=1.0, backend="auto")

Sides (GaLore's "std" rule, ``choose_side``): a p x q matrix with p >= q is reduced on the
right, ``R = G Q`` with ``Q: q x r`` and ``R: p x r``; otherwise on the left, ``R = Q^T G`` with
``Q: p x r`` and ``R: r x q``. So the basis always spans the smaller dimension and the state
is ``r (p + q)``-ish, never ``p q``. ``project_back`` is the inverse map, ``Q R`` or ``R Q^T``.

The step (bias-corrected Adam on R; ``bc_i = 1 - beta_i^step``)::

    R  = project(G, Q)                       # GEMM 1          (LoRDO: of A = G + E, and
                                             #                  E <- A - project_back(R))
    m  = b1 m + (1-b1) R ;  v = b2 v + (1-b2) R^2
    N  = (m / bc1) / (sqrt(v / bc2) + eps)                    # r x q, one fused pass
    W <- (1 - lr wd) W - lr c project_back(N)                 # GEMM 2, update in its epilogue
        [LoRDO: - lr (1 - omega) G / (mu (D + eps))]          # one fused full-size pass

with ``c = scale`` (GaLore, ``error=None``) or ``c = omega * scale`` (LoRDO, ``error`` given).
LoRDO's full-rank normaliser (docs/algorithms.md §3, the documented choice) is
``D = sqrt(mean over the rank dimension of v_hat)``, i.e. the RMS of ``sqrt(v_hat)`` along the
rank axis, broadcast along the other one:

* side "left"  (R: r x q): ``D_j = sqrt(mean_k v_hat[k, j])``, one value per **column** j of W
  (shape ``(1, q)``), broadcast over W's p rows;
* side "right" (R: p x r): ``D_i = sqrt(mean_k v_hat[i, k])``, one value per **row** i of W
  (shape ``(p, 1)``), broadcast over W's q columns.

The G in the full-rank term is the (clipped) gradient itself, not ``G + E``. ``omega`` and
``mu`` only act in LoRDO mode: with ``error=None`` the step is GaLore's and ``omega`` must be 0
(a ValueError otherwise -- a quasi-hyperbolic weight without the error buffer would silently
switch on the full-rank term). With ``error`` given, ``omega = 1`` is GaLore's step plus error
feedback and ``omega = 0`` a pure normalised full-rank step.

Memory traffic per step (p x q full-size tensors; the small r x q ones are ~r/p of that):
GaLore mode reads G once (GEMM 1) and reads + writes W once (GEMM 2 with ``beta = 1 - lr wd``,
``alpha = -lr scale``: the BLAS/cuBLAS epilogue, or the Triton kernel below) -- no full-size
temporary at all. A transient R workspace of the low-rank shape is allocated per step
(``r q`` elements); it is overwritten with N. LoRDO adds ``E += G`` (read G, E; write E), the
residual GEMM ``E -= project_back(R)`` (read + write E) and the full-rank pass (read G, W;
write W).

Backends: "reference" (plain PyTorch, any float dtype, float64 for ground truth), "cpu"
(torch GEMMs + ``thresher._C``: float32/float64), "triton" (torch GEMM 1, a Triton moments
kernel and a Triton GEMM whose epilogue applies the whole parameter update, full-rank term
included: W is read and written once; float32/bf16/fp16), "cuda" (cuBLAS GEMMs +
``thresher._C_cuda`` elementwise kernels; float32/bf16/fp16). The CPU/CUDA/Triton backends
need the parameter's rows contiguous (``stride(-1) == 1``); others go to the reference.

The step is registered as the mutating custom op ``thresher::lowrank_adam_step`` (so
``torch.compile`` treats it as one opaque call); projection and refresh are plain torch ops.
"""
from __future__ import annotations

import contextlib
import math
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
from thresher.core.checks import check_choice, check_finite_range, check_has_data, check_range, check_tensor

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
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------
# Sides, projection, back-projection
# ----------------------------------------------------------------------------------------


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
    return Q.T @ grad if side == "left" else grad @ Q


def project_back(R: Tensor, Q: Tensor, side: str) -> Tensor:
    """The inverse map of :func:`project`: ``Q R`` (side "left") or ``R Q^T`` ("right")."""
    check_choice("side", side, SIDES)
    check_tensor("R", R, ndim=2, dtypes=FLOAT_DTYPES)
    r = R.size(0) if side == "left" else R.size(1)
    check_tensor("Q", Q, ndim=2, dtypes=(R.dtype,), device=R.device, shape=(None, r))
    return Q @ R if side == "left" else R @ Q.T


# ----------------------------------------------------------------------------------------
# Projection refresh
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lapack_threads(t: Tensor):
    """One intra-op thread around the thin/small LAPACK factorisations (QR of dim x k, eigh
    of k x k) on the CPU. They are chains of small parallel regions, and when the cores are
    shared (here: 2 cores, ~6 busy processes) every region waits for a descheduled
    partner thread: measured medians, 2 threads vs 1, QR of 2048 x 264: 829 ms vs 92 ms,
    eigh of 264 x 264: 8.9 s vs 47 ms. Single-threaded they cost a few % of the GEMMs even on
    an idle machine. (set_num_threads is process-wide: other Python threads running torch
    ops at the same moment run single-threaded too.)"""
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


def refresh_projection(matrix: Tensor, rank: int, *, side: str = "auto", method: str = "power",
                       prev: Tensor | None = None, seed: int = 0, niter: int | None = None,
                       oversample: int | None = None) -> Tensor:
    """An orthonormal basis Q (``dim x rank``, dim = p for side "left", q for "right") of the
    top-``rank`` singular subspace of ``matrix`` on that side, in ``matrix``'s dtype.

    * ``"svd"``: exact, ``torch.linalg.svd`` (left: ``U[:, :r]``, right: ``Vh[:r].T``); on
      the CPU single-threaded (see ``_lapack_threads``). 10-100x the cost of the others.
    * ``"random"``: randomised SVD (Halko, Martinsson & Tropp 2011): a Gaussian sketch of
      ``rank + oversample`` columns drawn from ``seed`` (on the CPU, so every device and
      every rank draws the same one; ``oversample`` default ``max(8, rank // 8)``: on a
      flat i^-0.5 spectrum at 2048 x 5632, rank 256, 8 extra columns captured 98.99% of the
      exact SVD's energy, 32 captured 99.28% for ~9% more work), ``niter`` power
      iterations (default 2) with QR
      re-orthonormalisation, then Rayleigh-Ritz (eigh of the small ``k x k`` Gram matrix of the projection,
      k = rank + oversample) picks the top ``rank`` directions.
    * ``"power"`` (the default): ``niter`` (default 1) power iterations ``Q <- orth(M M^T Q)``
      warm-started from ``prev`` (the previous basis): two thin GEMMs and one thin QR; signs
      fixed so the columns stay aligned with ``prev``'s. Without ``prev`` it is ``"random"``
      (so the first refresh of a schedule is randomised, the later ones warm).

    Deterministic: the same inputs and seed give the same Q on every rank (given the same
    BLAS thread count). Work is in float32 for bf16/fp16 inputs, else in the input dtype."""
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
    work = torch.float32 if matrix.dtype in (torch.bfloat16, torch.float16) else matrix.dtype
    dim = _basis_dim(matrix.shape, side)
    if prev is not None:
        check_tensor("prev", prev, ndim=2, device=matrix.device, shape=(dim, rank),
                     dtypes=FLOAT_DTYPES)
    if method == "power" and prev is None:
        method = "random"

    if method == "svd":
        # Under _lapack_threads like the other factorisations: on shared cores LAPACK's SVD
        # with 2 threads took 9-13x longer than with 1 (1024 x 2816: 19-23 s vs 1.5-2.5 s),
        # which is why this path measured 0.2-0.7x galore-torch's (single-threaded) SVD.
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
    # of svd(B): same vectors, ~10x faster here (k = 264, n = 5632: 0.14 s vs 1.3 s), and
    # float64 keeps the small eigenvalues (sigma^2) resolved.
    B = Y.T @ M
    with _lapack_threads(B):
        _, vecs = torch.linalg.eigh((B @ B.T).double())
    Q = Y @ vecs[:, -rank:].flip(-1).to(work)
    return Q.contiguous().to(matrix.dtype)


# ----------------------------------------------------------------------------------------
# The fused step: the per-backend elementwise pieces
# ----------------------------------------------------------------------------------------


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _moment_view(R: Tensor, side: str) -> tuple[int, int, int, int]:
    """(rows = rank, cols, row_stride, col_stride) of a low-rank tensor: the kernels reduce
    over rows (the rank dimension) for LoRDO's D."""
    if side == "left":  # r x q
        return R.size(0), R.size(1), R.stride(0), R.stride(1)
    return R.size(1), R.size(0), R.stride(1), R.stride(0)  # p x r seen transposed


def _reference_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    acc = _acc(R.dtype)
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


def _stream(x):
    return torch.cuda.current_stream(x.device).cuda_stream


def _cuda_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    rows, cols, rs, cs = _moment_view(R, side)
    dsum = torch.empty(cols, dtype=torch.float32, device=R.device) if want_dsum else None
    _native.cuda_ext().lowrank_moments(
        R.data_ptr(), m.data_ptr(), v.data_ptr(), rows, cols, rs, cs,
        _native.DTYPE_CODES[R.dtype], b1, b2, bc1, bc2, eps, _native.ptr(dsum), _stream(R))
    return dsum


def _cuda_fullrank(param, grad, w, side):
    # w: float32, contiguous (the caller keeps it alive until the asynchronous kernel ran:
    # it is freed to the caching allocator, whose reuse is ordered on this stream)
    p, q = param.shape
    _native.cuda_ext().lowrank_fullrank_update(
        param.data_ptr(), grad.data_ptr(), w.data_ptr(), p, q,
        param.stride(0), grad.stride(0), _native.DTYPE_CODES[param.dtype],
        0 if side == "left" else 1, _stream(param))


def _triton_module():
    return triton_module("lowrank")


def _triton_moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_dsum):
    rows, cols, rs, cs = _moment_view(R, side)
    dsum = torch.empty(cols, dtype=torch.float32, device=R.device) if want_dsum else None
    with on_device(R):
        _triton_module().lowrank_moments(R, m, v, rows, cols, rs, cs, b1, b2, bc1, bc2, eps, dsum)
    return dsum


def _step_impl(backend, param, grad, Q, m, v, side, step, lr, b1, b2, eps, wd, scale, error,
               omega, mu):
    """The whole step for one backend (inputs validated by ``lowrank_adam_step``)."""
    lordo = error is not None
    rank = Q.size(1)
    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    ref = backend == "reference"
    acc = _acc(param.dtype)
    # -- projection (GEMM 1), with LoRDO's error feedback -----------------------------------
    A = grad
    if lordo:
        error.add_(grad)  # E <- G + E: the tensor to project
        A = error
    if ref:
        R = project(A.to(acc), Q.to(acc), side)
    else:
        R = project(A, Q, side).contiguous()  # transient r x q (or p x r) workspace
    if lordo:
        # E <- A - project_back(R): in place, no full-size temporary (reference: plain torch)
        if ref:
            error.copy_(A.to(acc) - project_back(R, Q.to(acc), side))
        elif side == "left":
            error.addmm_(Q, R, alpha=-1.0)
        else:
            error.addmm_(R, Q.T, alpha=-1.0)
    # -- moments + normalised direction (one pass over R; R becomes N) ----------------------
    want_d = lordo and omega < 1.0
    moments = {"reference": _reference_moments, "cpu": _cpu_moments, "cuda": _cuda_moments,
               "triton": _triton_moments}[backend]
    dsum = moments(R, m, v, side, b1, b2, bc1, bc2, eps, want_d)
    N = R
    # -- parameter update: GEMM 2 with the update in its epilogue [+ full-rank term] ---------
    beta = 1.0 - lr * wd
    alpha = -lr * scale * (omega if lordo else 1.0)
    w = None
    if want_d:
        coef = lr * (1.0 - omega) / mu
        w = coef / ((dsum.to(acc) / rank).sqrt() + eps)
    if ref:
        upd = param.to(acc) * beta + alpha * project_back(N, Q.to(acc), side)
        if w is not None:
            upd = upd - grad.to(acc) * (w[None, :] if side == "left" else w[:, None])
        param.copy_(upd)
        return
    if backend == "triton":
        a, b = (Q, N) if side == "left" else (N, Q.T)
        with on_device(param):
            _triton_module().backproject_update(param, a, b, beta, alpha,
                                                grad if w is not None else None,
                                                None if w is None else w.float().contiguous(),
                                                0 if side == "left" else 1)
        return
    if alpha != 0.0:
        if side == "left":
            param.addmm_(Q, N, beta=beta, alpha=alpha)
        else:
            param.addmm_(N, Q.T, beta=beta, alpha=alpha)
    elif beta != 1.0:
        param.mul_(beta)
    if w is not None:  # w is in the accumulation dtype: param's on the CPU, float32 on CUDA
        (_cpu_fullrank if backend == "cpu" else _cuda_fullrank)(param, grad, w.contiguous(), side)


def reference_lowrank_adam_step(param, grad, Q, exp_avg, exp_avg_sq, *, side, step, lr, beta1,
                                beta2, eps, weight_decay=0.0, scale=1.0, error=None, omega=0.0,
                                mu=1.0):
    """The reference backend (plain PyTorch in float32, float64 for float64 inputs): the
    ground every other backend is tested against. Same contract as ``lowrank_adam_step``."""
    with torch.no_grad():
        _step_impl("reference", param, grad, Q, exp_avg, exp_avg_sq, side, int(step), lr, beta1,
                   beta2, eps, weight_decay, scale, error, omega, mu)


# ----------------------------------------------------------------------------------------
# Backends
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


# ----------------------------------------------------------------------------------------
# Custom op + public function
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("thresher::lowrank_adam_step",
                         mutates_args=("param", "exp_avg", "exp_avg_sq", "error"))
def _lowrank_adam_step_op(param: Tensor, grad: Tensor, Q: Tensor, exp_avg: Tensor,
                          exp_avg_sq: Tensor, error: Optional[Tensor], side: str, step: int,
                          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                          scale: float, omega: float, mu: float, backend: str) -> None:
    _step_impl(backend, param, grad, Q, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps,
               weight_decay, scale, error, omega, mu)


@_lowrank_adam_step_op.register_fake
def _(param, grad, Q, exp_avg, exp_avg_sq, error, side, step, lr, beta1, beta2, eps,
      weight_decay, scale, omega, mu, backend):
    return None


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
    ``step`` is the 1-based step count after this update (int or a 0-d tensor). See the
    module docstring for the maths, the axes of D and the memory traffic. Gradient clipping
    is the caller's (pass the clipped gradient)."""
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
        _lowrank_adam_step_op(param, grad, Q, exp_avg, exp_avg_sq, error, side, step, lr, beta1,
                              beta2, eps, weight_decay, scale, omega, mu, name)
    else:  # eager: skip the custom-op dispatch overhead (~20 us a call, per parameter)
        _step_impl(name, param, grad, Q, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps,
                   weight_decay, scale, error, omega, mu)
