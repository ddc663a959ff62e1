"""LoRDO: distributed low-rank optimisation with infrequent communication (docs/algorithms.md §3,
arXiv 2602.04396).

Each rank keeps its own copy of the model (no DDP wrapper; the user calls ``opt.step()``
after ``loss.backward()`` on its local batch). For a matrix parameter G (p x q) with the
shared rank-r basis Q, every local step is::

    Ĝ  = clip(grad, ρ)                     (global norm over all parameters of the optimizer)
    g  = Qᵀ (Ĝ + E)          E = Ĝ + E − Q g          (projection with error feedback)
    u  = β1 u + (1−β1) g     v = β2 v + (1−β2) g²     (low-rank moments, r x q)
    θ ← θ − η [ (1−ω) Ĝ / (μ (D + ε)) + ω Q (û / (√v̂ + ε)) ]

(written for the "left" side; "right" reduces the columns, R = G Q), with the whole step
(projection, error feedback, moments, normaliser, decoupled weight decay) done by
``thresher.ops.lowrank.lowrank_adam_step(..., error=E, omega=ω, mu=μ)``. Vectors and scalars
take plain AdamW steps. Every ``sync_every`` steps all ranks average Δ = θ^m − θ_anchor
(one all-reduce, or a compression codec with error feedback), take the outer step, and
recompute every Q from the averaged Δ with a seed shared by all ranks, so the bases stay
identical everywhere without being sent.

Choices (docs/algorithms.md §3 marks them (choice); each is an argument):
- ``D``: column-wise RMS of √v̂ over the rank dimension, broadcast over the other one (what
  ``lowrank_adam_step`` computes); the low-rank moments are bias-corrected (Adam's rule).
- ``side="auto"``: GaLore's rule (p >= q -> "right", else "left"); or force "left"/"right".
- ``proj``: how Q is recomputed from Δ at a sync (``refresh_projection``'s methods): "svd"
  (exact top-r singular vectors), "power" (one power iteration warm-started from the
  previous Q), "random" (randomised SVD from the shared seed).
- ``init_proj``: the first Q, before any Δ exists: "random" (the top-r basis of a Gaussian
  matrix drawn from the shared seed: a random subspace, no communication) or "grad" (top-r of the all-reduced first gradient;
  costs one dense gradient all-reduce, counted in ``comm_bytes``).
- ``moments``: what the low-rank moments do when Q changes: "keep" (GaLore) or "reset".
- ``outer``: "average" (θ = θ_anchor + Δ) or "nesterov" (DiLoCo's outer SGD with Nesterov
  momentum, ``outer_lr``/``outer_momentum``).
- ``compression``: None (dense float32 all-reduce of Δ), or a codec name ("topk",
  "quant8", "quant4", "quant2", or a ``thresher.comm.Codec``; settings in
  ``compression_options``, e.g. ``dict(k=64, chunk=4096, bits=2)``) applied to every
  matrix's Δ^m (low-rank or not: the embedding is often the largest) with its own
  error-feedback buffer, all-gathered and averaged (top-k: over the ranks that sent each
  index); vectors and scalars are always averaged densely (they are tiny).
- The error buffer E stays local and is never reset or sent.

Memory per p x q matrix, float32: Q r·min-side·4 bytes, u and v 2·r·(other side)·4, plus the
full-size E and the anchor (2·p·q·4; the anchor is what every local-update method needs to
form Δ), plus p·q·4 for the outer momentum ("nesterov") and p·q·4 for the codec's error
buffer (compression). AdamW's state is 2·p·q·4 for comparison.

Bytes: a dense sync sends ``4 · Σ numel`` (all parameters) per rank; ``init_proj="grad"``
adds ``4 · Σ numel(matrices)`` once; a codec sync sends each matrix's packed message plus
a 16-byte header (``thresher.comm``'s accounting) and ``4 · Σ numel(vectors)``.
"""
from __future__ import annotations

import torch

from thresher.core.checks import check_choice, check_float, check_int
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
    """See the module docstring. ``rank`` may be set per parameter group (``rank=None`` in a
    group: its matrices take plain AdamW steps, like the vectors)."""

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
        if rank is not None:
            check_int("rank", rank)
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
            r = group["rank"]
            if r is not None:
                check_int(f"param_groups[{gi}]['rank']", r)
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
