"""LowRankAdam: GaLore-style low-rank Adam (docs/algorithms.md §4), a drop-in torch.optim.Optimizer.

For every 2-D parameter W (p x q) whose smaller side is large enough (below), the gradient is
projected onto a rank-r basis Q of its smaller side (``thresher.ops.lowrank.choose_side``:
p >= q -> ``R = G Q``, else ``R = Q^T G``), Adam's moments live on R, and the update is
back-projected::

    W <- (1 - lr wd) W - lr scale project_back(m_hat / (sqrt(v_hat) + eps))

in one call of the fused op ``thresher.ops.lowrank.lowrank_adam_step`` (two GEMMs, one pass
over the low-rank tensors, the parameter update folded into the back-projection GEMM).
Q is recomputed from the current gradient on the first step and then every
``update_proj_gap`` steps (``refresh_projection``); the moments are kept across a refresh
(GaLore's choice). ``proj``:

* ``"power"`` (default): the first refresh is a randomised SVD, every later one a single
  power iteration warm-started from the previous Q (two thin GEMMs and a thin QR). At
  2048 x 5632, rank 256 it is ~40-100x faster than an SVD and captures 99.97% of the exact
  basis's gradient energy; the cold first refresh ~99% (benchmarks/bench_lowrank.py).
* ``"random"``: a randomised SVD from scratch at every refresh (no memory of the old basis).
* ``"svd"``: the exact top-r singular vectors (``torch.linalg.svd``, what galore-torch's
  GaLoreAdamW computes) -- the option when the basis must be exact, at 10-100x the cost. Everything else -- vectors, scalars,
tensors with more than 2 dimensions and small matrices -- takes plain AdamW steps (torch's
single-tensor AdamW arithmetic).

Which matrices are low-rank: ``min(p, q) > rank`` by default (a matrix no larger than the
rank gains nothing); with ``min_dim`` set, every matrix with ``min(p, q) >= min_dim`` is, its
rank clipped to ``min(p, q)`` (``min_dim=1, rank=min(p, q)`` gives a full-rank rotated Adam:
the known-answer tests use it).

Options (all per parameter group): lr, betas, eps, weight_decay, rank (None: AdamW for the
whole group), update_proj_gap, scale, proj, side ("auto", "left", "right"), min_dim, niter,
oversample, seed, backend (of the fused op).

State (``optimizer.state[p]``, tensors only, so ``state_dict()`` survives
``torch.load(weights_only=True)`` and resumes bit-identically on the CPU):

* low-rank matrix: ``step`` (0-d float32, as torch's AdamW), ``exp_avg`` and ``exp_avg_sq``
  (the projected shape: ``(r, q)`` or ``(p, r)``) and ``Q`` (``(min side, r)``), all in the
  parameter's dtype: ``r (2 max(p, q) + min(p, q))`` elements against AdamW's ``2 p q``. No
  other full-size buffer is kept; each step allocates one transient ``r x max(p, q)``
  workspace (the projected gradient, overwritten by the update direction), and a refresh
  the temporaries of its SVD.
* everything else: ``step``, ``exp_avg``, ``exp_avg_sq`` (parameter-shaped).

Refresh seeds: ``seed + 1000003 * index + refresh_count`` (index = the parameter's position
in the optimizer), so the "random" sketches are reproducible and differ between matrices.
Gradient accumulation works as with any optimizer: ``step()`` uses whatever ``p.grad`` holds.
"""
from __future__ import annotations

import math

import torch

from thresher.core.checks import check_choice, check_finite_range
from thresher.ops.lowrank import (
    METHODS,
    choose_side,
    lowrank_adam_step,
    refresh_projection,
)

__all__ = ["LowRankAdam"]


def _check_int(name, value, lo, *, none_ok=False):
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}{' or None' if none_ok else ''}, got {value!r}")


class LowRankAdam(torch.optim.Optimizer):
    """See the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj: str = "power", *, side: str = "auto",
                 min_dim: int | None = None, niter: int | None = None,
                 oversample: int | None = None,
                 seed: int = 0, backend: str = "auto"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
                        eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj=proj, side=side,
                        min_dim=min_dim, niter=niter, oversample=oversample, seed=seed,
                        backend=backend)
        self._check_group(defaults)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):  # a group's own overrides, named by group
            self._check_group(group, f"param_groups[{i}]")

    @staticmethod
    def _check_group(g: dict, where: str = "") -> None:
        def n(key):  # the argument's name, or param_groups[i]['key'] for a group
            return f"{where}[{key!r}]" if where else key

        check_finite_range(n("lr"), g["lr"], 0.0)
        betas = g["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{n('betas')} must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            check_finite_range(f"{n('betas')}[{i}]", b, 0.0, 1.0, hi_open=True)
        check_finite_range(n("eps"), g["eps"], 0.0)
        check_finite_range(n("weight_decay"), g["weight_decay"], 0.0)
        check_finite_range(n("scale"), g["scale"])
        _check_int(n("rank"), g["rank"], 1, none_ok=True)
        _check_int(n("update_proj_gap"), g["update_proj_gap"], 1)
        _check_int(n("min_dim"), g["min_dim"], 1, none_ok=True)
        _check_int(n("niter"), g["niter"], 0, none_ok=True)
        _check_int(n("oversample"), g["oversample"], 0, none_ok=True)
        _check_int(n("seed"), g["seed"], 0)
        check_choice(n("proj"), g["proj"], METHODS)
        check_choice(n("side"), g["side"], ("auto", "left", "right"))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    # ------------------------------------------------------------------------------------

    @staticmethod
    def lowrank_rank(group: dict, p: torch.Tensor) -> int | None:
        """The rank this parameter is optimised at, or None for plain AdamW."""
        r = group["rank"]
        if r is None or p.dim() != 2:
            return None
        small = min(p.shape)
        if group["min_dim"] is None:
            return r if small > r else None
        return min(r, small) if small >= group["min_dim"] else None

    @staticmethod
    def _side(group, p):
        return choose_side(tuple(p.shape)) if group["side"] == "auto" else group["side"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise TypeError("LowRankAdam does not support sparse gradients")
                state = self.state[p]
                rank = self.lowrank_rank(group, p)
                if rank is None:
                    self._adamw(group, p, grad, state, beta1, beta2)
                    continue
                side = self._side(group, p)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    low = (rank, p.shape[1]) if side == "left" else (p.shape[0], rank)
                    state["exp_avg"] = torch.zeros(low, dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(low, dtype=p.dtype, device=p.device)
                done = int(state["step"].item())
                gap = group["update_proj_gap"]
                if done % gap == 0 or "Q" not in state:
                    Q = refresh_projection(
                        grad, rank, side=side, method=group["proj"], prev=state.get("Q"),
                        seed=group["seed"] + 1000003 * index + done // gap,
                        niter=group["niter"], oversample=group["oversample"])
                    if "Q" in state:
                        state["Q"].copy_(Q)
                    else:
                        state["Q"] = Q
                state["step"] += 1
                lowrank_adam_step(
                    p, grad, state["Q"], state["exp_avg"], state["exp_avg_sq"], side=side,
                    step=done + 1, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], scale=group["scale"],
                    backend=group["backend"])
        return loss

    @staticmethod
    def _adamw(group, p, grad, state, beta1, beta2):
        # torch.optim.AdamW's single-tensor arithmetic, so the two agree bit for bit.
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = int(state["step"].item())
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (state["exp_avg_sq"].sqrt() / bc2_sqrt).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bc1)

    def state_bytes(self) -> dict:
        """Bytes of optimizer state: ``{"lowrank": ..., "adamw": ..., "total": ...}``."""
        low = full = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = sum(t.numel() * t.element_size() for t in self.state.get(p, {}).values()
                        if isinstance(t, torch.Tensor))
                if self.lowrank_rank(group, p) is None:
                    full += n
                else:
                    low += n
        return {"lowrank": low, "adamw": full, "total": low + full}
