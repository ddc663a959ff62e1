"""The low-rank ops LoRDO calls, from ``thresher.ops.lowrank`` (INTERFACES.md).

Until that module is in the tree, a plain-PyTorch stand-in with the same signatures and
maths is used (projection with error feedback, bias-corrected low-rank moments, the
full-rank quasi-hyperbolic term with D = column-wise RMS of sqrt(v_hat) over the rank
dimension, decoupled weight decay). It is deleted once the op lands.
"""
from __future__ import annotations

import torch

try:  # the real ops
    from thresher.ops.lowrank import (  # noqa: F401
        choose_side,
        lowrank_adam_step,
        project,
        project_back,
        refresh_projection,
    )

    HAVE_LOWRANK_OPS = True
except ImportError:  # pragma: no cover - exercised only before the op lands
    HAVE_LOWRANK_OPS = False

    def choose_side(shape) -> str:
        p, q = shape
        return "right" if p >= q else "left"

    def project(grad, Q, side):
        return Q.T @ grad if side == "left" else grad @ Q

    def project_back(R, Q, side):
        return Q @ R if side == "left" else R @ Q.T

    def refresh_projection(matrix, rank, *, side, method="svd", prev=None, seed=0, niter=1,
                           oversample=8):
        dim = matrix.shape[0] if side == "left" else matrix.shape[1]
        if method == "random":
            gen = torch.Generator().manual_seed(int(seed))
            A = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
            return torch.linalg.qr(A).Q.to(matrix.dtype)
        M = matrix.double() if side == "left" else matrix.double().T
        if method == "power" and prev is not None:
            Q = prev.double()
            for _ in range(niter):
                Q = torch.linalg.qr(M @ (M.T @ Q)).Q
            return Q.to(matrix.dtype)
        U = torch.linalg.svd(M, full_matrices=False).U
        return U[:, :rank].contiguous().to(matrix.dtype)

    @torch.no_grad()
    def lowrank_adam_step(param, grad, Q, exp_avg, exp_avg_sq, *, side, step, lr, beta1, beta2,
                          eps, weight_decay=0.0, scale=1.0, error=None, omega=0.0, mu=1.0,
                          backend="auto"):
        A = grad if error is None else grad + error
        R = project(A, Q, side)
        if error is not None:
            error.copy_(A - project_back(R, Q, side))
        exp_avg.lerp_(R, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        m_hat = exp_avg / (1.0 - beta1 ** step)
        v_hat = exp_avg_sq / (1.0 - beta2 ** step)
        upd = project_back(m_hat / (v_hat.sqrt() + eps), Q, side) * scale
        if weight_decay:
            param.mul_(1.0 - lr * weight_decay)
        if omega == 0.0 and error is None:
            param.add_(upd, alpha=-lr)
            return
        # D: RMS over the rank dimension of sqrt(v_hat), broadcast over the other dimension
        if side == "left":
            D = v_hat.mean(0, keepdim=True).sqrt()          # (1, q)
        else:
            D = v_hat.mean(1, keepdim=True).sqrt()          # (p, 1)
        param.add_((1.0 - omega) * grad / (mu * (D + eps)) + omega * upd, alpha=-lr)
