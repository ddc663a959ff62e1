"""Online batch selection: the selectors that run *inside* the training loop.

``build_online_selector(name, model, val_samples, **opts).select(input_ids, labels)`` returns
``alpha``, (B,) or (B, T) 0/1 weights with exactly ``budget(gamma, count)`` ones on the top
scores (ties to the earlier position), for ``model.loss(..., sample_weight=alpha)`` or
``token_weight=alpha``. Here: random, highloss, RHO-LOSS (``rho``) and RHO-1 (``rho1``);
BLADE is in blade.py. Interface: docs/interfaces.md#online-selection; the methods:
docs/algorithms.md §4 "Online selection baselines".
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from thresher.core.checks import (
    IGNORE_INDEX,
    check_betas,
    check_choice,
    check_float,
    check_int,
    check_tensor,
)

from .registry import ONLINE

__all__ = [
    "GRANULARITIES",
    "ONLINE_SELECTORS",
    "IGNORE_INDEX",
    "budget",
    "topk_weights",
    "ValStream",
    "OnlineSelector",
    "RandomSelector",
    "HighLossSelector",
    "RhoLossSelector",
    "Rho1Selector",
    "fit_reference",
    "make_reference",
    "make_reference_optimizer",
    "build_online_selector",
]

GRANULARITIES = ("sequence", "token")
ONLINE_SELECTORS = tuple(ONLINE.names())  # the built-in ones
_INT_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------
# Argument checks (ValueError/TypeError naming the argument)
# ----------------------------------------------------------------------------------------


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
        raise TypeError("model must be an nn.Module with a loss(input_ids, labels, *, "
                        "reduction=..., sample_weight=..., token_weight=...) method "
                        f"(thresher.models.GPT), got {type(model).__name__}")
    return model


def _check_batch(input_ids, labels):
    check_tensor("input_ids", input_ids, ndim=2, dtypes=_INT_DTYPES)
    if input_ids.size(1) < 2:
        raise ValueError(f"input_ids must have at least 2 positions (next-token targets), got "
                         f"shape {tuple(input_ids.shape)}")
    if labels is None:
        return input_ids
    check_tensor("labels", labels, shape=tuple(input_ids.shape), dtypes=_INT_DTYPES,
                 device=input_ids.device)
    return labels


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------


def budget(gamma: float, count: int) -> int:
    """``round(gamma * count)`` rounding halves up (Python's ``round`` rounds half to even,
    which would make the kept fraction depend on the parity of the count), at least 1 when
    ``count >= 1`` **(choice)**: an all-zero alpha would make the weighted loss 0 and waste
    the step. ``count = 0`` keeps nothing."""
    if count <= 0:
        return 0
    # the 1e-9 guards products like 0.3 * 5 = 1.4999999999999998 against rounding down
    return min(count, max(1, int(math.floor(gamma * count + 0.5 + 1e-9))))


def topk_weights(scores: Tensor, k: int) -> Tensor:
    """0/1 float32 tensor shaped like ``scores`` with ones at the ``k`` largest entries
    (row-major flattened order breaks ties: the earlier entry wins). ``-inf`` entries are
    only taken if ``k`` exceeds the finite ones; NaN scores are an error."""
    flat = scores.reshape(-1)
    if bool(torch.isnan(flat).any()):
        raise ValueError("scores contain NaN (non-finite model losses?)")
    alpha = torch.zeros(flat.numel(), dtype=torch.float32, device=scores.device)
    if k > 0:
        # a stable descending sort keeps equal scores in index order; topk gives no such
        # guarantee. Sorting B*T floats is negligible next to the forward passes.
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        alpha[order] = 1.0
    return alpha.reshape(scores.shape)


# ----------------------------------------------------------------------------------------
# Validation data: a seeded, resumable stream of batches
# ----------------------------------------------------------------------------------------


def _as_ids_labels(val_data, name: str = "val_data") -> tuple[Tensor, Tensor]:
    """Accepts ``thresher.data.Samples`` (anything with ``input_ids``/``labels``), a (N, T)
    id tensor (labels = ids) or an ``(input_ids, labels)`` pair."""
    if val_data is None:
        raise ValueError(f"{name} is required: validation samples from the target distribution "
                         "(thresher.data.Samples, a (N, T) LongTensor or (input_ids, labels))")
    if hasattr(val_data, "input_ids"):
        ids, labels = val_data.input_ids, getattr(val_data, "labels", None)
    elif isinstance(val_data, Tensor):
        ids, labels = val_data, None
    elif isinstance(val_data, (tuple, list)) and len(val_data) == 2:
        ids, labels = val_data
    else:
        raise TypeError(f"{name} must be Samples, a (N, T) LongTensor or an (input_ids, labels) "
                        f"pair, got {type(val_data).__name__}")
    check_tensor(f"{name}.input_ids", ids, ndim=2, dtypes=_INT_DTYPES)
    if labels is None:
        labels = ids
    check_tensor(f"{name}.labels", labels, shape=tuple(ids.shape), dtypes=_INT_DTYPES)
    if ids.size(0) == 0 or ids.size(1) < 2:
        raise ValueError(f"{name} is empty: need at least one sample of at least 2 tokens, got "
                         f"shape {tuple(ids.shape)}")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError(f"{name} has no target token (every label is {IGNORE_INDEX})")
    return ids, labels


class ValStream:
    """Cycles over validation samples in a seeded random order, ``batch_size`` at a time
    (each epoch a fresh permutation from ``seed + epoch``). The position is two ints, so a
    resumed run draws exactly the batches the uninterrupted one would."""

    def __init__(self, val_data, batch_size: int = 16, seed: int = 0, name: str = "val_data"):
        self.input_ids, self.labels = _as_ids_labels(val_data, name)
        self.batch_size = min(check_int("val_batch_size", batch_size, 1), self.input_ids.size(0))
        self.seed = int(seed)
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.input_ids.size(0), generator=g)

    def next(self, device=None) -> tuple[Tensor, Tensor]:
        if self.cursor + self.batch_size > self._perm.numel():
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.input_ids[idx].to(device), self.labels[idx].to(device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation()


# ----------------------------------------------------------------------------------------
# Selectors
# ----------------------------------------------------------------------------------------


class _eval_mode:
    """Scores are computed in eval mode (no dropout noise in the ranking); restores the
    module's previous mode."""

    def __init__(self, module: nn.Module):
        self.module, self.was = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was)


class OnlineSelector:
    """Base class: validates the batch, asks :meth:`scores` for a ``(B,)`` (sequence) or
    ``(B, T-1)`` (token, aligned with ``labels[:, 1:]``) score tensor and applies the top-k
    oracle. Subclasses implement ``scores`` and extend ``state_dict``."""

    name = "base"
    # whether the constructor takes target-distribution samples after the model
    uses_val_data = False

    def __init__(self, model: nn.Module, *, gamma: float = 0.6, granularity: str = "sequence"):
        self.model = check_model(model)
        self.gamma = check_float("gamma (the kept fraction)", gamma, 0.0, 1.0, lo_open=True)
        check_choice("granularity", granularity, GRANULARITIES)
        self.granularity = granularity
        self.calls = 0
        self.fwd_tokens = 0      # tokens through no-grad forward passes (selection)
        self.fwdbwd_tokens = 0   # tokens through forward+backward passes (reference training)
        self.last_scores: Tensor | None = None

    # -- scoring helpers ------------------------------------------------------------------
    def _losses(self, module: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
        """No-grad per-sample ``(B,)`` or per-token ``(B, T-1)`` losses of ``module``."""
        reduction = "sample" if self.granularity == "sequence" else "none"
        with torch.no_grad(), _eval_mode(module):
            out = module.loss(input_ids, labels, reduction=reduction)
        self.fwd_tokens += input_ids.numel()
        return out.float()

    def _mask_invalid(self, scores: Tensor, labels: Tensor) -> Tensor:
        valid = labels[:, 1:] != IGNORE_INDEX
        if self.granularity == "sequence":
            valid = valid.any(1)
        return scores.masked_fill(~valid, -math.inf)

    def scores(self, input_ids: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def count(self, labels: Tensor) -> int:
        if self.granularity == "sequence":
            return labels.size(0)
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    # -- the public call ------------------------------------------------------------------
    def select(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        """Weights for one candidate batch: ``(B,)`` or ``(B, T)`` float32 of 0/1 with exactly
        ``budget(gamma, count)`` ones, on ``input_ids``' device."""
        labels = _check_batch(input_ids, labels)
        s = self._mask_invalid(self.scores(input_ids, labels), labels)
        self.last_scores = s
        self.calls += 1
        return self.oracle(s, labels)

    def __call__(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.select(input_ids, labels)

    def oracle(self, scores: Tensor, labels: Tensor) -> Tensor:
        """Top-``budget(gamma, count)`` 0/1 weights from masked scores; token-level weights
        get a zero column 0 so they line up with ``labels`` ((B, T))."""
        alpha = topk_weights(scores, budget(self.gamma, self.count(labels)))
        if self.granularity == "token":
            alpha = torch.cat([alpha.new_zeros(alpha.size(0), 1), alpha], dim=1)
        return alpha

    def on_step(self) -> None:
        """Nothing to do after the optimizer step (all work happens in ``select``); kept so
        training loops can call it for every selector."""

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gamma": self.gamma, "granularity": self.granularity,
                "calls": self.calls, "fwd_tokens": self.fwd_tokens,
                "fwdbwd_tokens": self.fwdbwd_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for selector {state.get('name')!r}, not {self.name!r}")
        for key in ("gamma", "granularity"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r} but this selector has "
                                 f"{key}={getattr(self, key)!r}")
        self.calls = int(state["calls"])
        self.fwd_tokens = int(state["fwd_tokens"])
        self.fwdbwd_tokens = int(state["fwdbwd_tokens"])


@ONLINE.register("random")
class RandomSelector(OnlineSelector):
    """Uniformly random subset (the baseline every method must beat)."""

    name = "random"

    def __init__(self, model: nn.Module, *, gamma: float = 0.6, granularity: str = "sequence",
                 seed: int = 0):
        super().__init__(model, gamma=gamma, granularity=granularity)
        self.generator = torch.Generator().manual_seed(int(seed))

    def scores(self, input_ids, labels):
        shape = (labels.size(0),) if self.granularity == "sequence" else tuple(labels[:, 1:].shape)
        return torch.rand(shape, generator=self.generator).to(input_ids.device)

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


@ONLINE.register("highloss")
class HighLossSelector(OnlineSelector):
    """Largest current training loss ``l_i(theta)`` (Loshchilov & Hutter's online batch
    selection, deterministic top-k variant)."""

    name = "highloss"

    def scores(self, input_ids, labels):
        return self._losses(self.model, input_ids, labels)


def fit_reference(reference: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                  val: ValStream, *, lam: float = 0.0, train_batch=None, grad_clip: float = 0.0
                  ) -> int:
    """``steps`` optimizer steps on ``L_val(w) + lam * L_train(alpha, w)`` where ``L_val`` is
    the mean loss of the next validation batch and ``L_train`` the alpha-weighted mean loss of
    ``train_batch = (input_ids, labels, alpha)`` (skipped when None or ``lam == 0``). Returns
    the number of tokens pushed through forward+backward."""
    device = _model_device(reference)
    was = reference.training
    reference.train()
    tokens = 0
    if train_batch is not None and lam > 0:
        # rows whose weights are all zero add nothing to the weighted mean (numerator or
        # denominator): drop them once, so a gamma-selection costs gamma of the batch
        ti, tl, alpha = train_batch
        rows = alpha > 0 if alpha.dim() == 1 else (alpha > 0).any(1)
        if not bool(rows.all()):
            train_batch = (ti[rows], tl[rows], alpha[rows])
    for _ in range(steps):
        vi, vl = val.next(device)
        loss = reference.loss(vi, vl)
        tokens += vi.numel()
        if train_batch is not None and lam > 0:
            ti, tl, alpha = train_batch
            kw = {"sample_weight": alpha} if alpha.dim() == 1 else {"token_weight": alpha}
            loss = loss + lam * reference.loss(ti, tl, **kw)
            tokens += ti.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reference.train(was)
    return tokens


def make_reference(model: nn.Module) -> nn.Module:
    """A separate copy of ``model`` (own parameters and buffers), never sharing storage."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    return ref


def make_reference_optimizer(reference: nn.Module, ref_lr: float, ref_betas,
                             ref_weight_decay: float) -> torch.optim.AdamW:
    """The reference's AdamW, its arguments checked under the selectors' names."""
    return torch.optim.AdamW(
        reference.parameters(), lr=check_float("ref_lr", ref_lr, 0.0, lo_open=True),
        betas=check_betas(ref_betas, "ref_betas"),
        weight_decay=check_float("ref_weight_decay", ref_weight_decay, 0.0))


@ONLINE.register("rho")
class RhoLossSelector(OnlineSelector):
    """RHO-LOSS (Mindermann et al. 2022; sequence level) and RHO-1 (Lin et al. 2024; token
    level): top excess loss ``l(theta) - l(w)`` against a *static* reference ``w``.

    ``reference``: a trained model with the same ``loss`` API, used as is. When None, ``w``
    starts as a copy of ``model`` at construction (its initialisation: the same architecture
    trained from scratch, as RHO-LOSS's irreducible-loss model) and is trained on the first
    ``select`` call for ``ref_steps`` AdamW steps on ``val_data`` (counted in
    ``fwdbwd_tokens``), then frozen."""

    name = "rho"
    uses_val_data = True

    def __init__(self, model: nn.Module, val_data=None, *, gamma: float = 0.6,
                 granularity: str = "sequence", reference: nn.Module | None = None,
                 ref_steps: int = 200, ref_lr: float = 1e-3, ref_weight_decay: float = 0.1,
                 ref_betas: tuple[float, float] = (0.9, 0.95), ref_grad_clip: float = 1.0,
                 val_batch_size: int = 16, seed: int = 0):
        super().__init__(model, gamma=gamma, granularity=granularity)
        self.ref_steps = check_int("ref_steps", ref_steps, 0)
        self.ref_grad_clip = check_float("ref_grad_clip", ref_grad_clip, 0.0)
        if reference is None:
            self.val = ValStream(val_data, val_batch_size, seed)
            if self.ref_steps < 1:
                raise ValueError("ref_steps must be >= 1 when no trained reference is given")
            self.reference = make_reference(model)
            self.trained = False
        else:
            check_model(reference)
            self.val = None if val_data is None else ValStream(val_data, val_batch_size, seed)
            self.reference = reference
            self.trained = True
        self.ref_optimizer = make_reference_optimizer(self.reference, ref_lr, ref_betas,
                                                      ref_weight_decay)

    def train_reference(self) -> None:
        """Trains the static reference once (no-op when already trained)."""
        if self.trained:
            return
        self.fwdbwd_tokens += fit_reference(self.reference, self.ref_optimizer, self.ref_steps,
                                            self.val, grad_clip=self.ref_grad_clip)
        self.trained = True

    def scores(self, input_ids, labels):
        self.train_reference()
        return (self._losses(self.model, input_ids, labels)
                - self._losses(self.reference, input_ids, labels))

    def state_dict(self):
        return {**super().state_dict(), "trained": self.trained,
                "reference": self.reference.state_dict(),
                "ref_optimizer": self.ref_optimizer.state_dict(),
                "val": None if self.val is None else self.val.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.reference.load_state_dict(state["reference"])
        self.ref_optimizer.load_state_dict(state["ref_optimizer"])
        self.trained = bool(state["trained"])
        if self.val is not None and state["val"] is not None:
            self.val.load_state_dict(state["val"])


@ONLINE.register("rho1")
class Rho1Selector(RhoLossSelector):
    """RHO-1: :class:`RhoLossSelector` at token level."""

    name = "rho1"
    uses_val_data = True

    def __init__(self, model, val_data=None, *, granularity: str = "token", **opts):
        super().__init__(model, val_data, granularity=granularity, **opts)


def build_online_selector(name: str, model: nn.Module, val_samples=None, **opts) -> OnlineSelector:
    """Factory behind ``thresher train --select NAME``: ``"blade"``, ``"rho"``, ``"rho1"``,
    ``"random"``, ``"highloss"``; ``opts`` go to the selector's constructor (``gamma``,
    ``granularity``, ``tau``, ``ref_steps``, ``lam``, ``ref_lr``, ``seed``, ...).
    ``val_samples`` (target-distribution samples) is required by "blade", "rho" and "rho1"
    and ignored by the others."""
    cls = ONLINE.get(name, "name")
    if cls.uses_val_data:
        return cls(model, val_samples, **opts)
    return cls(model, **opts)
