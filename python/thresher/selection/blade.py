"""BLADE: bi-level adaptive data selection, online, as an ``OnlineSelector``.

Each call keeps the top-gamma share of the batch by excess loss ``l_i(theta) - l_i(w)``
against a reference ``w`` that re-syncs every ``tau`` calls (``ref_schedule``: re-copied
from theta, or its own persistent iterate). The algorithm and our choices:
docs/algorithms.md §2; the reference schedules and their measurements: docs/blade.md.

    blade = BLADE(model, val_samples, gamma=0.6, tau=400, ref_steps=75, lam=1.0)
    alpha = blade.select(input_ids, labels)                  # (B,) 0/1
    model.loss(input_ids, labels, sample_weight=alpha).backward()
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from thresher.core.checks import IGNORE_INDEX, check_choice, check_float, check_int

from .online import (
    OnlineSelector,
    ValStream,
    fit_reference,
    make_reference,
    make_reference_optimizer,
)
from .registry import ONLINE

__all__ = ["BLADE", "REF_SCHEDULES"]


REF_SCHEDULES = ("reset", "persistent")


@ONLINE.register("blade")
class BLADE(OnlineSelector):
    """Online BLADE selector (docs/algorithms.md §2 and docs/blade.md).

    Parameters: ``model`` (theta, trained by the caller), ``val_data`` (target-distribution
    samples: ``thresher.data.Samples``, a (N, T) LongTensor or ``(input_ids, labels)``),
    ``gamma`` kept fraction in (0, 1], ``tau`` calls between reference syncs (>= 1),
    ``ref_steps`` K (>= 1), ``lam`` >= 0, ``granularity`` "sequence" | "token",
    ``ref_schedule`` "persistent" (default: ``w`` copied from theta once, then warm-started
    from its own previous value) | "reset" (``w <- theta`` at every sync, the schedule before
    issue 16), ``ref_warmup_steps`` K0 >= 0 (steps on ``L_val`` alone before the first sync,
    as RHO-LOSS fits its reference; default 200 for "persistent", 0 for "reset"),
    ``reset_ref_optimizer`` (default: True for "reset", False for "persistent"),
    ``val_batch_size``, ``seed`` (the validation batch order)."""

    name = "blade"
    uses_val_data = True

    def __init__(self, model: nn.Module, val_data, *, gamma: float = 0.6, tau: int = 400,
                 ref_steps: int = 75, lam: float = 1.0, granularity: str = "sequence",
                 ref_schedule: str = "persistent", ref_warmup_steps: int | None = None,
                 ref_lr: float = 1e-3, ref_betas: tuple[float, float] = (0.9, 0.95),
                 ref_weight_decay: float = 0.0, ref_grad_clip: float = 1.0,
                 reset_ref_optimizer: bool | None = None, val_batch_size: int = 16,
                 seed: int = 0):
        super().__init__(model, gamma=gamma, granularity=granularity)
        self.tau = check_int("tau", tau, 1)
        self.ref_steps = check_int("ref_steps", ref_steps, 1)
        self.lam = check_float("lam", lam, 0.0)
        self.ref_grad_clip = check_float("ref_grad_clip", ref_grad_clip, 0.0)
        check_choice("ref_schedule", ref_schedule, REF_SCHEDULES)
        self.ref_schedule = ref_schedule
        if ref_warmup_steps is None:  # RHO-LOSS's default reference fit (200 steps at 1e-3)
            ref_warmup_steps = 200 if ref_schedule == "persistent" else 0
        self.ref_warmup_steps = check_int("ref_warmup_steps", ref_warmup_steps, 0)
        if reset_ref_optimizer is None:
            reset_ref_optimizer = ref_schedule == "reset"
        if not isinstance(reset_ref_optimizer, bool):
            raise TypeError(f"reset_ref_optimizer must be a bool or None, got "
                            f"{type(reset_ref_optimizer).__name__}")
        self.reset_ref_optimizer = reset_ref_optimizer
        self.val = ValStream(val_data, val_batch_size, seed)
        self.reference = make_reference(model)
        self.ref_optimizer = make_reference_optimizer(self.reference, ref_lr, ref_betas,
                                                      ref_weight_decay)
        self.syncs = 0            # reference re-synchronisations so far
        self.last_sync_call = -1  # 0-based call index of the latest sync

    def _start_reference(self) -> None:
        """Before the first sync: ``w <- theta`` (theta may have changed since construction),
        fresh moments, then ``ref_warmup_steps`` steps on ``L_val`` alone."""
        with torch.no_grad():
            self.reference.load_state_dict(self.model.state_dict())
        self.ref_optimizer.state.clear()
        if self.ref_warmup_steps:
            self.fwdbwd_tokens += fit_reference(
                self.reference, self.ref_optimizer, self.ref_warmup_steps, self.val,
                grad_clip=self.ref_grad_clip)

    def sync_reference(self, input_ids: Tensor, labels: Tensor, alpha: Tensor) -> None:
        """``ref_steps`` AdamW steps on ``L_val(w) + lam L_train(alpha, w)`` with ``L_train``
        the alpha-weighted loss of this candidate batch, starting from ``w <- theta``
        ("reset") or from the current ``w`` ("persistent", after the first sync)."""
        if self.ref_schedule == "reset" and self.syncs > 0:
            with torch.no_grad():
                self.reference.load_state_dict(self.model.state_dict())
        if self.reset_ref_optimizer:
            self.ref_optimizer.state.clear()
        self.fwdbwd_tokens += fit_reference(
            self.reference, self.ref_optimizer, self.ref_steps, self.val, lam=self.lam,
            train_batch=(input_ids, labels, alpha), grad_clip=self.ref_grad_clip)
        self.syncs += 1
        self.last_sync_call = self.calls

    def scores(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        loss_theta = self._losses(self.model, input_ids, labels)
        if self.calls % self.tau == 0:
            if self.syncs == 0:
                self._start_reference()
            if self.syncs == 0 and not self.ref_warmup_steps:
                # no reference yet: L_train is the plain loss of the candidate batch
                if self.granularity == "sequence":
                    alpha = loss_theta.new_ones(labels.size(0))
                else:
                    alpha = (labels != IGNORE_INDEX).float()
            else:
                stale = loss_theta - self._losses(self.reference, input_ids, labels)
                alpha = self.oracle(self._mask_invalid(stale, labels), labels)
            self.sync_reference(input_ids, labels, alpha)
        return loss_theta - self._losses(self.reference, input_ids, labels)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau": self.tau, "ref_schedule": self.ref_schedule,
                "syncs": self.syncs,
                "last_sync_call": self.last_sync_call,
                "reference": self.reference.state_dict(),
                "ref_optimizer": self.ref_optimizer.state_dict(),
                "val": self.val.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if int(state["tau"]) != self.tau:
            raise ValueError(f"state has tau={state['tau']} but this selector has tau={self.tau}")
        # checkpoints from before the option are "reset" runs
        schedule = state.get("ref_schedule", "reset")
        if schedule != self.ref_schedule:
            raise ValueError(f"state has ref_schedule={schedule!r} but this selector has "
                             f"ref_schedule={self.ref_schedule!r}")
        self.syncs = int(state["syncs"])
        self.last_sync_call = int(state["last_sync_call"])
        self.reference.load_state_dict(state["reference"])
        self.ref_optimizer.load_state_dict(state["ref_optimizer"])
        self.val.load_state_dict(state["val"])
