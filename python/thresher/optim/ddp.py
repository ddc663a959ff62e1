"""The per-step baselines: DDPAdamW (AdamW on gradients all-reduced every step) and
LowRankDDP (GaLore's LowRankAdam on gradients all-reduced every step -- the LoRDO paper's
baseline). No model wrapper: after ``loss.backward()`` on the local batch, ``opt.step()``
averages the gradients (one collective, with a timeout) and steps.

Bytes per step and rank: ``element_size · Σ numel(grad)`` over the parameters that have a
gradient (float32: 4 bytes each), i.e. the full gradient for both methods -- LowRankAdam's
projection happens after the all-reduce, so every rank refreshes the same basis from the
same averaged gradient.
"""
from __future__ import annotations

import torch

from ._dist import DistMixin

__all__ = ["DDPAdamW", "LowRankDDP"]


class _AllReduceThenStep(DistMixin):
    """step(): average the gradients over the ranks, then the base optimizer's step."""

    _base: type
    _what: str

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        self._all_reduce_grads(self._what)
        self._base.step(self)
        self._counters["step"] += 1
        return loss


class DDPAdamW(_AllReduceThenStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments) + ``process_group``/``timeout``."""

    _base, _what = torch.optim.AdamW, "DDPAdamW gradient all_reduce"

    def __init__(self, params, lr: float = 1e-3, *, process_group=None, timeout=None, **adamw):
        torch.optim.AdamW.__init__(self, params, lr=lr, **adamw)
        self._dist_init(process_group, timeout)


def _lowrank_adam():
    try:
        from .lowrank_adam import LowRankAdam
    except ImportError:
        return None
    return LowRankAdam


_LowRankAdam = _lowrank_adam()


class LowRankDDP(_AllReduceThenStep, _LowRankAdam or torch.optim.Optimizer):
    """``thresher.optim.LowRankAdam`` (same arguments) + ``process_group``/``timeout``."""

    _base, _what = _LowRankAdam, "LowRankDDP gradient all_reduce"

    def __init__(self, params, lr: float = 1e-3, *, process_group=None, timeout=None, **lowrank):
        if _LowRankAdam is None:
            raise ImportError("LowRankDDP needs thresher.optim.LowRankAdam "
                              "(python/thresher/optim/lowrank_adam.py), which is missing")
        _LowRankAdam.__init__(self, params, lr=lr, **lowrank)
        self._dist_init(process_group, timeout)
