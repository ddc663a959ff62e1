"""LowRankAdam: GaLore-style low-rank Adam, a drop-in ``torch.optim.Optimizer``.

Every large enough 2-D parameter takes Adam steps on its gradient projected onto a rank-r
basis Q of its smaller side (one call of the fused ``thresher.ops.lowrank.lowrank_adam_step``);
Q is recomputed from the gradient every ``update_proj_gap`` steps (``refresh_projection``,
``proj="power"`` by default). Everything else takes plain AdamW steps. The algorithm, its
options, state and memory: docs/algorithms.md §4 "LowRankAdam (GaLore)"; the refresh methods
and their measurements: docs/lowrank-refresh.md.
"""
from __future__ import annotations

import math

import torch

from thresher.core.checks import (
    check_betas,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
)
from thresher.ops.lowrank import (
    METHODS,
    choose_side,
    lowrank_adam_step,
    refresh_projection,
)

__all__ = ["LowRankAdam"]


class LowRankAdam(torch.optim.Optimizer):
    """Low-rank Adam (docs/algorithms.md §4). Every option may be set per parameter group;
    ``rank=None`` makes a group plain AdamW."""

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

        check_float(n("lr"), g["lr"], 0.0)
        check_betas(g["betas"], n("betas"))
        check_float(n("eps"), g["eps"], 0.0)
        check_float(n("weight_decay"), g["weight_decay"], 0.0)
        check_float(n("scale"), g["scale"])
        check_optional_int(n("rank"), g["rank"], 1)
        check_int(n("update_proj_gap"), g["update_proj_gap"], 1)
        check_optional_int(n("min_dim"), g["min_dim"], 1)
        check_optional_int(n("niter"), g["niter"], 0)
        check_optional_int(n("oversample"), g["oversample"], 0)
        check_int(n("seed"), g["seed"], 0)
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
