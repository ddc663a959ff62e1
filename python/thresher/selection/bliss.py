"""BLISS -- bilevel influence scoring (Hao et al., arXiv 2510.06048) as a ``Scorer``.

A score model weights a proxy LM's training loss (softmax over the batch); the score model is
trained by the hypergradient of the proxy's validation loss: inverse-Hessian-vector product
by double backward, per-sample directional derivatives in one forward-mode JVP.
:func:`bliss_hypergradient` is that step for any per-sample loss of a parameter dict. The
outer step, our choices (``lr_z="auto"``, fresh inner batches, CPU-scale defaults) and the
options: docs/algorithms.md §1.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from thresher.models.gpt import ScoreModel
from thresher.core.checks import IGNORE_INDEX, check_betas, check_float, check_int

from .base import Scorer, check_samples, load_checkpoint, make_adamw, make_lm, register_scorer, \
    save_checkpoint, train_lm

__all__ = ["PAPER_DEFAULTS", "BlissConfig", "BlissScorer", "bliss_hypergradient",
           "batched_directional_derivative", "kl_to_target"]


# ----------------------------------------------------------------------------------------
# The hypergradient (generic)
# ----------------------------------------------------------------------------------------


def batched_directional_derivative(sample_loss: Callable[[dict], Tensor], params: dict,
                                   direction: dict) -> tuple[Tensor, Tensor]:
    """``(l, gz)`` with ``l = sample_loss(params)`` (B,) and ``gz_i = <grad_params l_i,
    direction>`` for every i in one forward-mode pass: the JVP of the per-sample loss vector
    along ``direction``. Memory: one forward's activations plus one tangent per activation
    (about 2x a forward), versus B backward passes for the per-sample loop."""
    primals = {k: v.detach() for k, v in params.items()}
    tangents = {k: direction[k].detach().to(v.dtype) for k, v in primals.items()}
    return jvp(sample_loss, (primals,), (tangents,))


def _check_lr_z(name: str, lr_z) -> float | str:
    """The z-loop step: ``"auto"`` or a finite number >= 0."""
    if isinstance(lr_z, str):
        if lr_z != "auto":
            raise ValueError(f"{name} must be a finite number >= 0 or 'auto', got {lr_z!r}")
        return lr_z
    return check_float(name, lr_z, 0.0)


def bliss_hypergradient(sample_loss: Callable[[dict], Tensor], params: dict, weights: Tensor,
                        val_grad: dict, *, z_loops: int = 3, lr_z: float | str = 1e-2,
                        lambda_z: float = 1e-2, reg: float = 0.0,
                        extra_lower: Callable[[dict], Tensor] | None = None,
                        power_iters: int = 3, power_state: dict | None = None):
    """Hypergradient of the validation loss w.r.t. the scores s of one batch (P = softmax(s)
    = ``weights``, detached) at the current lower-level parameters ``params``.

    ``sample_loss(params) -> (B,)`` must be built from differentiable, ``torch.func``-able ops
    (e.g. ``GPT.loss(..., backend="torch")`` under ``functional_call``). Returns
    ``(grad_s (B,), gz (B,), z dict)``.

    ``lr_z="auto"``: the step is ``1 / lambda_max(H + lambda_z I)``, estimated by
    ``power_iters`` power iterations (Hessian-vector products on the same graph). Pass the
    same ``power_state`` dict on every call to warm-start from the previous eigenvector; it
    is filled with ``vector`` (the eigenvector estimate), ``lambda_max`` and ``lr_z``.
    """
    check_int("z_loops", z_loops, 1)
    auto = _check_lr_z("lr_z", lr_z) == "auto"
    if auto:
        check_int("power_iters", power_iters, 1)
    P = weights.detach()
    names = list(params)
    p = {k: params[k].detach().requires_grad_(True) for k in names}
    F = [val_grad[k].detach() for k in names]
    if z_loops > 1 or auto:
        g = (P.to(torch.float64) * sample_loss(p).to(torch.float64)).sum()
        if extra_lower is not None:
            g = g + extra_lower(p)
        if reg:
            g = g + reg * sum((v * v).sum() for v in p.values())
        grads = torch.autograd.grad(g, [p[k] for k in names], create_graph=True)

        def hvp(v, retain):
            return torch.autograd.grad(grads, [p[k] for k in names], grad_outputs=v,
                                       retain_graph=retain)

        if auto:
            lr_z = _auto_step(hvp, F, lambda_z, power_iters, power_state)
    # z_1 = lr_z F (the z = 0 Hessian product is zero)
    z = [lr_z * f for f in F]
    if z_loops > 1:
        for it in range(1, z_loops):
            Hz = hvp(z, it < z_loops - 1)
            z = [zi - lr_z * (hzi - fi + lambda_z * zi) for zi, hzi, fi in zip(z, Hz, F)]
    if z_loops > 1 or auto:
        del grads, g
    zd = dict(zip(names, z))
    _, gz = batched_directional_derivative(sample_loss, p, zd)
    gz = gz.detach().to(P.dtype)
    grad_s = -P * (gz - (P * gz).sum())
    return grad_s, gz, zd


def _auto_step(hvp, F, lambda_z, iters, state):
    """``1 / lambda_max(H + lambda_z I)`` by power iteration, warm-started from
    ``state["vector"]`` (else from F). ``|Rayleigh quotient|`` of the last iterate: a negative
    dominant eigenvalue bounds the step just the same."""
    state = {} if state is None else state
    v = state.get("vector")
    v = [x.detach().clone() for x in (v if v is not None and len(v) == len(F) else F)]
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x.double() * x.double()).sum() for x in v)).clamp_min(1e-30)
        v = [(x / norm).to(x.dtype) for x in v]
        Hv = hvp(v, retain=True)
        Hv = [h + lambda_z * x for h, x in zip(Hv, v)]
        lam = abs(float(sum((a.double() * b.double()).sum() for a, b in zip(v, Hv))))
        v = [h.detach() for h in Hv]
    step = 1.0 / lam if lam > 0 else 1.0
    state.update(vector=v, lambda_max=lam, lr_z=step)
    return step


def kl_to_target(proxy_logits: Tensor, target_logits: Tensor, mask: Tensor) -> Tensor:
    """Token-mean KL(target || proxy) over the positions where ``mask`` is true."""
    lt = torch.log_softmax(target_logits.float(), -1)
    lp = torch.log_softmax(proxy_logits.float(), -1)
    kl = (lt.exp() * (lt - lp)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------


# The paper's reference hyper-parameters (docs/algorithms.md §1; Pythia-31M/160M proxies, GPU):
# ``build_scorer("bliss", vocab_size=V, model="base", **PAPER_DEFAULTS)``. The class
# defaults below are the ones that move a ~0.1M-parameter proxy within a CPU minute.
PAPER_DEFAULTS = dict(inner_steps=5, z_loops=3, lr_z=1e-2, lambda_z=1e-2, reg=1e-7,
                      proxy_lr=1e-5, score_lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)


@dataclass
class BlissConfig:
    model: object = field(default_factory=lambda: dict(d_model=64, n_layers=2, n_heads=2))
    warmup_steps: int = 100
    warmup_lr: float = 1e-3
    outer_steps: int = 60
    inner_steps: int = 5
    batch_size: int = 32
    val_batch_size: int = 32
    z_loops: int = 3
    lr_z: float | str = "auto"
    power_iters: int = 3
    lambda_z: float = 1e-2
    gamma: float = 0.0
    reg: float = 1e-7
    proxy_lr: float = 1e-3
    score_lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    clip: float = 1.0
    inner_fresh_batches: bool = True
    checkpoint_every: int = 10

    def __post_init__(self):
        for k in ("warmup_steps", "outer_steps", "inner_steps", "batch_size", "val_batch_size",
                  "z_loops", "checkpoint_every", "power_iters"):
            lo = 0 if k in ("warmup_steps", "outer_steps", "inner_steps") else 1  # steps vs sizes
            check_int(f"BLISS option {k}", getattr(self, k), lo)
        _check_lr_z("BLISS option lr_z", self.lr_z)
        for k in ("lambda_z", "gamma", "reg", "proxy_lr", "score_lr", "weight_decay", "clip"):
            check_float(f"BLISS option {k}", getattr(self, k), 0.0)
        check_betas(self.betas, "BLISS option betas")


class _SampleLoss(nn.Module):
    """``functional_call`` target: the per-sample loss vector of ``lm`` on a fixed batch,
    through the twice-differentiable, torch.func-compatible loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, labels):
        return self.lm.loss(ids, labels, reduction="sample", backend="torch")


def _ntok(labels):
    return (labels[:, 1:] != IGNORE_INDEX).sum(1).clamp_min(1).to(torch.float32)


@register_scorer("bliss")
class BlissScorer(Scorer):
    """Options: the fields of :class:`BlissConfig` (``steps`` and ``lr`` are accepted as
    aliases of ``outer_steps`` and ``proxy_lr``), plus ``target_model`` (an LM with the
    loss API to distil from when gamma > 0). ``fit`` runs the warm-up and the outer loop
    with atomic checkpoints every ``checkpoint_every`` outer steps; ``resume=True``
    continues bit-identically (RNG, optimizers and models are in the checkpoint).
    :meth:`fit_rounds` is the multi-round mode."""

    def __init__(self, **kw):
        super().__init__(**kw)
        opts = dict(self.options)
        self.target_model = opts.pop("target_model", None)
        # the generic options every scorer takes (``thresher score --steps/--lr``)
        for alias, name in (("steps", "outer_steps"), ("lr", "proxy_lr")):
            if alias in opts:
                if name in opts:
                    raise ValueError(f"give BLISS option {name} or its alias {alias}, not both")
                opts[name] = opts.pop(alias)
        names = {f.name for f in dataclasses.fields(BlissConfig)}
        bad = sorted(set(opts) - names)
        if bad:
            raise ValueError(f"unknown option(s) {bad} for method 'bliss'; expected some of "
                             f"{sorted(names | {'target_model'})}")
        self.cfg = BlissConfig(**opts)
        self.history: list[dict] = []

    # -- state -----------------------------------------------------------------------------

    def _build(self, seq_len):
        c = self.cfg
        self.proxy = make_lm(c.model, vocab_size=self.vocab_size, seq_len=seq_len,
                             seed=self.seed, device=self.device)
        self.gen = torch.Generator().manual_seed(self.seed + 1)
        self.step = 0
        self.power_state: dict = {}  # lr_z="auto": the warm-started top eigenvector

    def _new_proxy_opt(self):
        c = self.cfg
        return make_adamw(self.proxy.parameters(), lr=c.proxy_lr, betas=c.betas,
                          weight_decay=c.weight_decay)

    def _state(self, phase):
        return {"phase": phase, "step": self.step, "round": getattr(self, "round", 0),
                "proxy": self.proxy.state_dict(), "proxy_opt": self.proxy_opt.state_dict(),
                "warm_proxy": self.warm_state, "score": self.score_model.state_dict(),
                "score_opt": self.score_opt.state_dict(), "gen": self.gen.get_state(),
                "history": [dict(h) for h in self.history],
                "power_vector": self.power_state.get("vector"),
                "target_model": (self.target_model.state_dict()
                                 if self.target_model is not None else None)}

    def _load_state(self, st):
        self.step, self.round = int(st["step"]), int(st["round"])
        self.warm_state = st["warm_proxy"]
        self.proxy.load_state_dict(st["proxy"])
        self.proxy_opt.load_state_dict(st["proxy_opt"])
        self.score_model.load_state_dict(st["score"])
        self.score_opt.load_state_dict(st["score_opt"])
        self.gen.set_state(st["gen"])
        self.history = list(st["history"])
        self.power_state = ({} if st.get("power_vector") is None
                            else {"vector": st["power_vector"]})
        if st["target_model"] is not None and self.target_model is not None:
            self.target_model.load_state_dict(st["target_model"])

    def _ckpt_path(self):
        return None if self._ckpt_dir is None else self._ckpt_dir / "bliss.pt"

    def _save(self, phase):
        if self._ckpt_dir is not None:
            save_checkpoint(self._state(phase), self._ckpt_path())

    # -- the algorithm ----------------------------------------------------------------------

    def _batch(self, samples, n):
        ids, labels = samples.input_ids, samples.labels
        idx = torch.randint(0, ids.size(0), (min(n, ids.size(0)),), generator=self.gen)
        return ids[idx].to(self.device), labels[idx].to(self.device)

    def _lower_loss(self, ids, labels, P, *, params=None):
        """sum_i P_i l_i (+ gamma KL + reg ||theta||^2) for the inner steps, through the fused
        op: sample_weight P_i / n_i with a token sum = sum_i P_i (token-mean l_i)."""
        c = self.cfg
        loss = self.proxy.loss(ids, labels, reduction="sum", sample_weight=P / _ntok(labels))
        if c.gamma and self.target_model is not None:
            loss = loss + c.gamma * self._kl(self.proxy, ids, labels)
        if c.reg:
            loss = loss + c.reg * sum((p * p).sum() for p in self.proxy.parameters())
        return loss

    def _kl(self, lm, ids, labels):
        with torch.no_grad():
            tl = torch.nn.functional.linear(self.target_model(ids), self.target_model.lm_weight,
                                            self.target_model.lm_bias)
        from thresher.models.gpt import math_attention

        with math_attention():
            pl = torch.nn.functional.linear(lm(ids), lm.lm_weight, lm.lm_bias)
        return kl_to_target(pl, tl, labels != IGNORE_INDEX)

    def _weights(self, ids, labels, grad=False):
        with torch.set_grad_enabled(grad):
            s = self.score_model(ids, labels)
        return s, torch.softmax(s.float(), 0)

    def _outer_step(self, pool, target):
        c = self.cfg
        self.proxy.train()
        ids, labels = self._batch(pool, c.batch_size)
        for k in range(c.inner_steps):
            if c.inner_fresh_batches and k:
                ids, labels = self._batch(pool, c.batch_size)
            _, P = self._weights(ids, labels)
            loss = self._lower_loss(ids, labels, P.detach())
            self.proxy_opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.clip:
                torch.nn.utils.clip_grad_norm_(self.proxy.parameters(), c.clip)
            self.proxy_opt.step()
        if c.inner_fresh_batches:
            ids, labels = self._batch(pool, c.batch_size)
        vids, vlabels = self._batch(target, c.val_batch_size)
        params = dict(self.proxy.named_parameters())
        val_loss = self.proxy.loss(vids, vlabels)
        F = dict(zip(params, torch.autograd.grad(val_loss, list(params.values()))))
        s, P = self._weights(ids, labels, grad=True)
        wrapper = _SampleLoss(self.proxy)
        def kl_term(p):
            return c.gamma * functional_call(
                _KLCall(self), {"lm." + k: v for k, v in p.items()}, (ids, labels))

        extra = kl_term if c.gamma and self.target_model is not None else None
        grad_s, gz, _ = bliss_hypergradient(
            lambda p: functional_call(wrapper, {"lm." + k: v for k, v in p.items()}, (ids, labels)),
            params, P, F, z_loops=c.z_loops, lr_z=c.lr_z, lambda_z=c.lambda_z, reg=c.reg,
            extra_lower=extra, power_iters=c.power_iters, power_state=self.power_state)
        self.score_opt.zero_grad(set_to_none=True)
        s.backward(grad_s.to(s.dtype))
        if c.clip:
            torch.nn.utils.clip_grad_norm_(self.score_model.parameters(), c.clip)
        self.score_opt.step()
        self.step += 1
        self.history.append({"step": self.step, "val_loss": float(val_loss.detach()),
                             "gz_std": float(gz.std()), "s_std": float(s.detach().std()),
                             "lr_z": float(self.power_state.get("lr_z", c.lr_z)
                                           if c.lr_z == "auto" else c.lr_z)})

    def _warmup(self, pool, progress):
        c = self.cfg
        train_lm(self.proxy, pool, steps=c.warmup_steps, batch_size=c.batch_size, lr=c.warmup_lr,
                 weight_decay=c.weight_decay, seed=self.seed + 2, clip=c.clip, progress=progress,
                 desc="bliss: proxy warm-up", device=self.device)
        self.warm_state = {k: v.clone() for k, v in self.proxy.state_dict().items()}

    def _reset_proxy(self):
        self.proxy.load_state_dict(self.warm_state)
        self.proxy_opt = self._new_proxy_opt()

    def _fit(self, pool, target, progress):
        self._run_round(pool, target, progress, first=True)

    def _run_round(self, pool, target, progress, *, first):
        """Warm-up (first round) or proxy reset (later rounds), then the outer loop on
        ``pool``; resumes from the checkpoint when asked and one exists."""
        from tqdm.auto import tqdm

        c = self.cfg
        st = load_checkpoint(self._ckpt_path()) if (self._resume and self._ckpt_path()) else None
        if first:
            self._build(pool.input_ids.size(1))
            self.round = 0
            if st is None:
                self._warmup(pool, progress)
                self.score_model = ScoreModel.from_backbone(self.proxy)
                self.score_opt = make_adamw(self.score_model.parameters(), lr=c.score_lr,
                                            betas=c.betas, weight_decay=c.weight_decay)
                self.proxy_opt = self._new_proxy_opt()
                self._save("outer")
            else:
                self.score_model = ScoreModel(self.proxy.config).to(self.device)
                self.score_opt = make_adamw(self.score_model.parameters(), lr=c.score_lr,
                                            betas=c.betas, weight_decay=c.weight_decay)
                self.proxy_opt = self._new_proxy_opt()
                self._load_state(st)
                print(f"bliss: resuming from outer step {self.step} of {c.outer_steps} "
                      f"({self._ckpt_path()})", file=sys.stderr)
        bar = tqdm(total=c.outer_steps, initial=self.step, desc="bliss: outer", disable=not progress,
                   leave=False)
        while self.step < c.outer_steps:
            self._outer_step(pool, target)
            bar.update(1)
            if self.step % c.checkpoint_every == 0 or self.step == c.outer_steps:
                self._save("outer")
        bar.close()

    def fit_rounds(self, shards, target, *, fraction: float = 0.2,
                   train_target: Callable | None = None, select: Callable | None = None,
                   checkpoint_dir=None, resume=False, progress=True) -> list[np.ndarray]:
        """Multi-round BLISS. Round r: the proxy resets to its warm-up checkpoint (a fresh
        optimizer), the score model carries over, the outer loop runs on ``shards[r]`` (with
        KL to ``target_model`` if gamma > 0), the shard is scored and its top ``fraction``
        selected, and ``train_target(selected_samples)`` (e.g. a few steps of the target LM)
        runs before the next round. ``select(scores, fraction) -> sorted indices`` defaults
        to ``strategies.select_topk``. Returns the selected indices of each shard."""
        if not shards:
            raise ValueError("shards must hold at least one Samples")
        check_float("fraction", fraction, 0.0, 1.0, lo_open=True)
        if select is None:
            from thresher.selection.strategies import select_topk as select

        out = []
        for r, shard in enumerate(shards):
            check_samples(f"shards[{r}]", shard)
            sub = None if checkpoint_dir is None else f"{checkpoint_dir}/round{r}"
            self._ckpt_dir = None if sub is None else Path(sub)
            self._resume = bool(resume)
            if r == 0:
                self._run_round(shard, target, progress, first=True)
            else:
                st = load_checkpoint(self._ckpt_path()) if (resume and sub) else None
                if st is not None:
                    self._load_state(st)
                else:
                    self._reset_proxy()
                    self.step, self.round = 0, r
                self._run_round(shard, target, progress, first=False)
            self._fitted = True
            idx = np.asarray(select(self.score(shard), fraction))
            out.append(idx)
            if train_target is not None:
                train_target(shard[idx])
        return out

    @torch.no_grad()
    def _score(self, samples, batch_size, progress):
        from tqdm.auto import tqdm

        ids, labels = samples.input_ids, samples.labels
        self.score_model.eval()
        out = np.empty(ids.size(0), dtype=np.float32)
        for s in tqdm(range(0, ids.size(0), batch_size), desc="bliss: score",
                      disable=not progress, leave=False):
            e = min(ids.size(0), s + batch_size)
            # the logit, not the sigmoid: same ranking, no saturation ties in float32
            out[s:e] = self.score_model.logits(ids[s:e].to(self.device),
                                               labels[s:e].to(self.device)).float().cpu().numpy()
        return out


class _KLCall(nn.Module):
    """``functional_call`` target for the KL term inside the HVP graph."""

    def __init__(self, scorer):
        super().__init__()
        self.lm = scorer.proxy
        self._scorer = [scorer]  # not a submodule

    def forward(self, ids, labels):
        return self._scorer[0]._kl(self.lm, ids, labels)
