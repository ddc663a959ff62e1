"""DiLoCo and SparseLoCo: H local AdamW steps, then an outer step on the averaged
pseudo-gradient. No model wrapper; the user calls ``opt.step()``.

DiLoCo averages the change since the last sync with one dense all-reduce and takes an outer
SGD step with Nesterov momentum; SparseLoCo keeps an error buffer per parameter and sends
only its top-k per chunk, quantised (``thresher.comm.TopKCodec``), averaged over the ranks
that sent each index. The outer loop, the defaults, the bytes per sync and the memory:
docs/algorithms.md §4 "DDP, low-rank DDP, DiLoCo, SparseLoCo".
"""
from __future__ import annotations

import torch

from thresher.core.checks import check_float, check_int

from ._codecs import codec_mean_, make_codec
from ._dist import DistMixin, all_reduce_mean_, outer_step_

__all__ = ["DiLoCo", "SparseLoCo"]


class DiLoCo(DistMixin, torch.optim.AdamW):
    """``DiLoCo(params, lr, sync_every=H, outer_lr=0.7, outer_momentum=0.9, nesterov=True,
    process_group=None, timeout=None, **adamw)``: the inner optimizer is torch.optim.AdamW
    (its arguments pass through)."""

    _counter_names = ("step", "comm_bytes", "syncs")
    _what = "DiLoCo sync all_reduce"

    def __init__(self, params, lr: float = 1e-3, *, sync_every: int = 32, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, process_group=None,
                 timeout=None, **adamw):
        check_int("sync_every", sync_every)
        check_float("outer_lr", outer_lr, 0.0, lo_open=True)
        check_float("outer_momentum", outer_momentum, 0.0, 1.0)
        torch.optim.AdamW.__init__(self, params, lr=lr, **adamw)
        self.sync_every, self.outer_lr = sync_every, outer_lr
        self.outer_momentum, self.nesterov = outer_momentum, bool(nesterov)
        self._dist_init(process_group, timeout)

    def _settings(self) -> dict:
        return dict(sync_every=self.sync_every, outer_lr=self.outer_lr,
                    outer_momentum=self.outer_momentum, nesterov=self.nesterov)

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _init_outer_state(self) -> list:
        # taken before the first inner step, stored after it: AdamW initialises a
        # parameter's state only while that state is empty
        return [(p, p.detach().clone()) for p in self._params() if "anchor" not in self.state[p]]

    @torch.no_grad()
    def _store_outer_state(self, fresh) -> None:
        for p, anchor in fresh:
            st = self.state[p]
            st["anchor"] = anchor
            if self.outer_momentum:
                st["outer_buf"] = torch.zeros_like(p)
            self._init_extra(p, st)

    def _init_extra(self, p, st) -> None:
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        fresh = self._init_outer_state()
        torch.optim.AdamW.step(self)
        self._store_outer_state(fresh)
        self._counters["step"] += 1
        if self._counters["step"] % self.sync_every == 0:
            params = self._params()
            deltas = [p.detach() - self.state[p]["anchor"] for p in params]
            self._average(params, deltas)
            for p, d in zip(params, deltas):
                st = self.state[p]
                outer_step_(p, st["anchor"], d, st.get("outer_buf"), lr=self.outer_lr,
                            momentum=self.outer_momentum, nesterov=self.nesterov)
            self._counters["syncs"] += 1
        return loss

    def _average(self, params, deltas) -> None:
        self._count(all_reduce_mean_(deltas, self.dist, self._what))


class SparseLoCo(DiLoCo):
    """``SparseLoCo(params, lr, sync_every=H, beta=0.95, k=64, chunk=4096, bits=2,
    codec=None, outer_lr=1.0, outer_momentum=0.0, ...)``."""

    _what = "SparseLoCo sync"

    def __init__(self, params, lr: float = 1e-3, *, sync_every: int = 32, beta: float = 0.95,
                 k: int = 64, chunk: int = 4096, bits: int = 2, codec=None,
                 outer_lr: float = 1.0, outer_momentum: float = 0.0, nesterov: bool = False,
                 **kwargs):
        check_float("beta", beta, 0.0, 1.0)
        check_int("k", k)
        check_int("chunk", chunk)
        if k > chunk:
            raise ValueError(f"k must be <= chunk, got k={k}, chunk={chunk}")
        self.beta, self.chunk = float(beta), chunk
        self.codec = make_codec(codec) if codec is not None else make_codec(
            "topk", k=k, chunk=chunk, bits=bits)
        super().__init__(params, lr, sync_every=sync_every, outer_lr=outer_lr,
                         outer_momentum=outer_momentum, nesterov=nesterov, **kwargs)

    def _settings(self) -> dict:
        return dict(super()._settings(), beta=self.beta, chunk=self.chunk, codec=self.codec)

    def _sparse(self, p) -> bool:
        return p.numel() >= self.chunk

    def _init_extra(self, p, st) -> None:
        if self._sparse(p):
            st["ef"] = torch.zeros_like(p)

    def _average(self, params, deltas) -> None:
        sparse = [i for i, p in enumerate(params) if self._sparse(p)]
        dense = [i for i, p in enumerate(params) if not self._sparse(p)]
        self._count(all_reduce_mean_([deltas[i] for i in dense], self.dist,
                                     "SparseLoCo dense all_reduce"))
        errors = [self.state[params[i]]["ef"] for i in sparse]
        for e in errors:
            e.mul_(self.beta)  # e = β e + Δ^m: the codec adds Δ^m and removes what it sent
        self._count(codec_mean_([deltas[i] for i in sparse], errors, self.codec, self.dist,
                                self._what))
