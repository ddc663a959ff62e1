"""LoRDO: distributed low-rank optimisation with infrequent communication (arXiv 2602.04396).

Each rank keeps its own copy of the model (no DDP wrapper; call ``opt.step()`` after
``loss.backward()`` on the local batch). Matrices take low-rank Adam steps with projection
error feedback and a full-rank quasi-hyperbolic term (one ``lowrank_adam_step`` call each);
vectors take AdamW steps. Every ``sync_every`` steps the ranks average the change since the
last sync (dense, or through a compression codec), take the outer step, and recompute every
basis from the averaged change with a shared seed, so the bases agree without being sent.
The step, the sync, every option, the memory and the bytes: docs/algorithms.md §3.
"""
from __future__ import annotations

import torch

from thresher.core.checks import check_choice, check_float, check_int, check_optional_int
from thresher.ops.lowrank import choose_side, lowrank_adam_step, refresh_projection

from ._codecs import codec_mean_, make_codec
from ._dist import (
    DistMixin,
    adamw_update_,
    all_reduce_mean_,
    clip_coef,
    outer_step_,
)
__all__ = ["LoRDO"]

OUTER = ("average", "nesterov")
PROJ = ("svd", "power", "random")
INIT_PROJ = ("random", "grad")
MOMENTS = ("keep", "reset")
SIDES = ("auto", "left", "right")


class LoRDO(DistMixin, torch.optim.Optimizer):
    """LoRDO (docs/algorithms.md §3). ``rank`` may be set per parameter group (``rank=None``
    in a group: its matrices take plain AdamW steps, like the vectors)."""

    _counter_names = ("step", "comm_bytes", "syncs")

    def __init__(self, params, lr: float = 1e-3, *, rank: int | None = 32, sync_every: int = 16,
                 omega: float = 0.5, mu: float = 1.0, clip: float | None = 1.0,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 outer: str = "average", outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 compression=None, compression_options: dict | None = None, proj: str = "svd", init_proj: str = "random",
                 moments: str = "keep", side: str = "auto", seed: int = 0,
                 process_group=None, timeout: float | None = None):
        # lr, omega, mu, betas, eps and weight_decay are checked per param group by
        # _dist_init (check_group_hparams), like every distributed optimizer's
        check_optional_int("rank", rank)
        check_int("sync_every", sync_every)
        if clip is not None:
            check_float("clip", clip, 0.0)
        for name, value, choices in (("outer", outer, OUTER), ("proj", proj, PROJ),
                                     ("init_proj", init_proj, INIT_PROJ),
                                     ("moments", moments, MOMENTS), ("side", side, SIDES)):
            check_choice(name, value, choices)
        check_float("outer_lr", outer_lr, 0.0, lo_open=True)
        check_float("outer_momentum", outer_momentum, 0.0, 1.0)
        defaults = dict(lr=lr, rank=rank, omega=omega, mu=mu, eps=eps,
                        betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
                        weight_decay=weight_decay, side=side)
        torch.optim.Optimizer.__init__(self, params, defaults)
        self.sync_every, self.clip, self.outer = sync_every, clip, outer
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.proj, self.init_proj, self.moments = proj, init_proj, moments
        self.seed = check_int("seed", seed, 0)
        self.codec = make_codec(compression, **(compression_options or {}))
        self._dist_init(process_group, timeout)

    def _check_groups(self) -> None:
        for gi, group in enumerate(self.param_groups):
            r = check_optional_int(f"param_groups[{gi}]['rank']", group["rank"])
            check_choice(f"param_groups[{gi}]['side']", group["side"], SIDES)
            for pi, p in enumerate(group["params"]):
                if p.dim() == 2 and r is not None and r > min(p.shape):
                    raise ValueError(
                        f"rank={r} is larger than the matrix param_groups[{gi}]['params'][{pi}] "
                        f"of shape {tuple(p.shape)}: rank must be <= min(p, q) = {min(p.shape)} "
                        f"(or put that matrix in a group with rank=None for plain AdamW)")

    def _settings(self) -> dict:
        return dict(sync_every=self.sync_every, clip=self.clip, outer=self.outer,
                    outer_lr=self.outer_lr, outer_momentum=self.outer_momentum, proj=self.proj,
                    init_proj=self.init_proj, moments=self.moments, seed=self.seed,
                    compression=self.codec)

    # -------------------------------------------------------------------------------------
    def _is_lowrank(self, group, p) -> bool:
        return p.dim() == 2 and group["rank"] is not None

    def _side(self, group, p) -> str:
        return choose_side(tuple(p.shape)) if group["side"] == "auto" else group["side"]

    def _all(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def _proj_seed(self, index: int) -> int:
        # distinct per matrix and per sync, identical on every rank
        return self.seed + 1_000_003 * self._counters["syncs"] + 7919 * index

    @torch.no_grad()
    def _init_state(self, grads: dict, coef: float) -> None:
        pending = [(g, p) for g, p in self._all() if not self.state[p]]
        if not pending:
            return
        first = {}
        if self.init_proj == "grad":
            mats = [(g, p) for g, p in pending if self._is_lowrank(g, p)]
            # the mean of the clipped first gradients (what the first local step will use)
            first = {p: (grads[p] * coef if p in grads else torch.zeros_like(p)) for _, p in mats}
            self._count(all_reduce_mean_(list(first.values()), self.dist, "LoRDO first-gradient all_reduce"))
        for index, (group, p) in enumerate(self._all()):
            st = self.state[p]
            if st:
                continue
            st["anchor"] = p.detach().clone()
            if self._is_lowrank(group, p):
                side = self._side(group, p)
                if p in first:
                    src = first[p]
                else:  # a random subspace: the top-r basis of a Gaussian matrix from the seed
                    gen = torch.Generator().manual_seed(self._proj_seed(index))
                    src = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                Q = refresh_projection(src, group["rank"], side=side, method="svd")
                R = torch.zeros((group["rank"], p.shape[1]) if side == "left"
                                else (p.shape[0], group["rank"]), dtype=p.dtype, device=p.device)
                st["Q"] = Q.contiguous()
                st["exp_avg"], st["exp_avg_sq"] = R, R.clone()
                st["error"] = torch.zeros_like(p)
            else:
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            if self.outer == "nesterov":
                st["outer_buf"] = torch.zeros_like(p)
            if self.codec is not None and p.dim() == 2:
                st["comm_error"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        grads = {p: p.grad for _, p in self._params_with_grad()}
        for p, g in grads.items():
            if g.is_sparse:
                raise TypeError("LoRDO does not support sparse gradients")
        coef = clip_coef(list(grads.values()), self.clip)
        self._init_state(grads, coef)
        self._counters["step"] += 1
        t = self._counters["step"]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p not in grads:
                    continue
                g = grads[p] if coef == 1.0 else grads[p] * coef
                st = self.state[p]
                if self._is_lowrank(group, p):
                    lowrank_adam_step(
                        p, g, st["Q"], st["exp_avg"], st["exp_avg_sq"], side=self._side(group, p),
                        step=t, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], scale=1.0, error=st["error"],
                        omega=group["omega"], mu=group["mu"])
                else:
                    adamw_update_(p, g, st["exp_avg"], st["exp_avg_sq"], step=t, lr=group["lr"],
                                  beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"])
        if t % self.sync_every == 0:
            self._sync()
        return loss

    @torch.no_grad()
    def _sync(self) -> None:
        items = list(self._all())
        deltas = [p.detach() - self.state[p]["anchor"] for _, p in items]
        if self.codec is None:
            self._count(all_reduce_mean_(deltas, self.dist, "LoRDO sync all_reduce"))
        else:
            mats = [i for i, (g, p) in enumerate(items) if p.dim() == 2]
            vecs = [i for i in range(len(items)) if i not in set(mats)]
            self._count(all_reduce_mean_([deltas[i] for i in vecs], self.dist,
                                         "LoRDO sync all_reduce (vectors)"))
            self._count(codec_mean_([deltas[i] for i in mats],
                                    [self.state[items[i][1]]["comm_error"] for i in mats],
                                    self.codec, self.dist, "LoRDO compressed sync"))
        nesterov = self.outer == "nesterov"
        for index, ((group, p), delta) in enumerate(zip(items, deltas)):
            st = self.state[p]
            outer_step_(p, st["anchor"], delta, st.get("outer_buf"),
                        lr=self.outer_lr if nesterov else 1.0,
                        momentum=self.outer_momentum if nesterov else 0.0, nesterov=nesterov)
            if self._is_lowrank(group, p):
                side = self._side(group, p)
                st["Q"].copy_(refresh_projection(delta, group["rank"], side=side, method=self.proj,
                                                 prev=st["Q"], seed=self._proj_seed(index)))
                if self.moments == "reset":
                    st["exp_avg"].zero_()
                    st["exp_avg_sq"].zero_()
        self._counters["syncs"] += 1
