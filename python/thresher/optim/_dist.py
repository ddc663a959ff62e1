"""Shared machinery of the distributed optimizers (LoRDO, DDPAdamW, LowRankDDP, DiLoCo,
SparseLoCo): :class:`DistMixin` (the process group, the construction-time agreement of the
ranks, byte accounting, checkpoints), the AdamW arithmetic every method reuses, the outer step
and the param groups' hyper-parameter checks. The collectives themselves (timeouts,
:class:`CollectiveError`) are ``thresher.comm.collectives``'s. What ``comm_bytes`` counts and
how the ranks are made to agree: docs/distributed.md.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

import torch

from thresher.comm.collectives import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    GroupInfo,
    all_gather,
    all_reduce_mean_,
    barrier,
    broadcast_,
    resolve_group,
)
from thresher.core.checks import check_betas, check_float

__all__ = [
    "CollectiveError",
    "DEFAULT_TIMEOUT_S",
    "DistMixin",
    "GroupInfo",
    "resolve_group",
    "all_reduce_mean_",
    "barrier",
    "check_ranks_agree",
    "adamw_update_",
    "clip_coef",
    "outer_step_",
    "check_group_hparams",
    "describe",
]


# ----------------------------------------------------------------------------------------
# Arithmetic shared by every method
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def adamw_update_(p, g, exp_avg, exp_avg_sq, *, step: int, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's arithmetic (decoupled decay, bias-corrected moments), in place.
    Written out once so DDPAdamW, DiLoCo's inner steps and LoRDO's vectors share it."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bc1)


@torch.no_grad()
def clip_coef(grads: Sequence[torch.Tensor], max_norm: float | None) -> float:
    """Global-norm clipping factor, torch.nn.utils.clip_grad_norm_'s rule
    ``min(1, max_norm / (norm + 1e-6))`` with the norm accumulated in float64; 1.0 when
    ``max_norm`` is None or 0. The caller scales (the gradients themselves are not touched)."""
    if not grads or not max_norm:
        return 1.0
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    return min(1.0, max_norm / (norm + 1e-6))


# ----------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------


class DistMixin:
    """The distributed half of every optimizer here: the group, the timeout, ``comm_bytes``
    and the scalar counters (``_counters``: name -> int) that ``state_dict`` saves as int64
    tensors beside torch's per-parameter state, so ``torch.load(weights_only=True)``
    round-trips. Mixed in before a ``torch.optim.Optimizer`` (AdamW, LowRankAdam, ...)."""

    _counter_names: tuple[str, ...] = ("step", "comm_bytes")

    def _dist_init(self, process_group=None, timeout=None) -> None:
        """The last call of every constructor, after its own argument checks: resolves the
        group, checks the param groups' hyper-parameters, checks that the ranks agree and
        broadcasts rank 0's parameters (docs/distributed.md)."""
        self.dist = resolve_group(process_group, timeout)
        check_group_hparams(self)
        self._check_groups()
        self._counters = {k: 0 for k in self._counter_names}
        if self.dist.world > 1:
            name = type(self).__name__
            check_ranks_agree(describe(self), self.dist, name)
            with torch.no_grad():
                broadcast_([p for g in self.param_groups for p in g["params"]], self.dist,
                           f"{name} broadcast of the initial parameters")

    def _check_groups(self) -> None:
        """A subclass's own checks of its param groups (run after the common ones)."""

    def _settings(self) -> dict:
        """The optimizer-level settings every rank must share (the param groups'
        hyper-parameters, shapes and dtypes are compared as well)."""
        return {}

    @property
    def comm_bytes(self) -> int:
        """Payload bytes this rank has sent since construction (docs/distributed.md, "Byte
        accounting")."""
        return self._counters["comm_bytes"]

    @property
    def step_count(self) -> int:
        return self._counters["step"]

    @staticmethod
    def _run_closure(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _count(self, nbytes: int) -> None:
        self._counters["comm_bytes"] += int(nbytes)

    def state_dict(self):
        sd = super().state_dict()
        sd["thresher"] = {k: torch.tensor(v, dtype=torch.int64) for k, v in self._counters.items()}
        sd["thresher"]["world"] = torch.tensor(self.dist.world, dtype=torch.int64)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("thresher", None)
        if extra is None:
            raise ValueError(f"state_dict has no 'thresher' entry: not a {type(self).__name__} "
                             "checkpoint")
        world = int(extra.get("world", self.dist.world))
        if world != self.dist.world:
            raise ValueError(f"state_dict was saved with world size {world}, this process group "
                             f"has {self.dist.world}")
        super().load_state_dict(state_dict)
        for k in self._counter_names:
            self._counters[k] = int(extra[k])

    @torch.no_grad()
    def _all_reduce_grads(self, what: str) -> None:
        """Replaces every .grad by its mean over the ranks (one collective) and counts it."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        self._count(all_reduce_mean_(grads, self.dist, what))

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (every tensor in ``self.state``)."""
        return sum(t.numel() * t.element_size() for st in self.state.values()
                   for t in st.values() if isinstance(t, torch.Tensor))

    def _params_with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p


# ----------------------------------------------------------------------------------------
# Agreement of the ranks
# ----------------------------------------------------------------------------------------


def _canon(v) -> str:
    """A text for a setting's value that is the same on every rank that holds the same value
    (floats exactly; 3 and 3.0 alike; no memory addresses)."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, bool) or v is None or isinstance(v, (str, int)):
        return repr(v)
    if isinstance(v, float):
        return repr(int(v)) if v.is_integer() and abs(v) < 2 ** 53 else repr(v)
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_canon(x) for x in v) + ")"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_canon(v[k])}" for k in sorted(v, key=repr)) + "}"
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    text = repr(v)  # codecs print their settings
    return type(v).__name__ if " at 0x" in text else text


def describe(opt) -> list[list[str]]:
    """``[name, value]`` pairs every rank must share: the class, ``opt._settings()``, each
    param group's hyper-parameters and each parameter's shape and dtype."""
    items = [["optimizer", type(opt).__name__]]
    items += [[k, _canon(v)] for k, v in opt._settings().items()]
    items.append(["number of param_groups", str(len(opt.param_groups))])
    index = 0
    for gi, group in enumerate(opt.param_groups):
        where = f"param_groups[{gi}]"
        items += [[f"{where}[{k!r}]", _canon(v)] for k, v in sorted(group.items())
                  if k != "params"]
        items.append([f"number of parameters in {where}", str(len(group["params"]))])
        for pi, p in enumerate(group["params"]):
            items.append([f"parameter {index} ({where}['params'][{pi}])",
                          f"shape {tuple(p.shape)} {_canon(p.dtype)}"])
            index += 1
    return items


def check_ranks_agree(items: list, info: GroupInfo, what: str) -> None:
    """Raises the same ValueError on every rank when the ranks' ``items`` differ, naming each
    difference and every rank's value. One all_gather of 16 bytes per rank when they agree;
    the descriptions themselves are gathered only on a mismatch."""
    if info.world == 1:
        return
    blob = json.dumps(items).encode()
    digest = int.from_bytes(hashlib.sha1(blob).digest()[:8], "little") >> 1
    head = torch.tensor([digest, len(blob)], dtype=torch.int64, device=info.device)
    heads = torch.stack(all_gather(head, info, f"{what} agreement check")).cpu()
    if bool((heads[:, 0] == heads[0, 0]).all()):
        return
    buf = torch.zeros(int(heads[:, 1].max()), dtype=torch.uint8)
    buf[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    blobs = all_gather(buf.to(info.device), info, f"{what} agreement details")
    descs = [dict(json.loads(bytes(b[:int(n)].cpu().tolist())))
             for b, n in zip(blobs, heads[:, 1])]
    raise ValueError(_disagreement(descs, what))


def _disagreement(descs: list[dict], what: str, limit: int = 6) -> str:
    diffs = []
    for name in dict.fromkeys(k for d in descs for k in d):
        ranks_by_value: dict = {}
        for r, d in enumerate(descs):
            ranks_by_value.setdefault(d.get(name, "(absent)"), []).append(r)
        if len(ranks_by_value) > 1:
            diffs.append(f"{name}: " + "; ".join(
                f"{v} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                for v, rs in ranks_by_value.items()))
    more = f" (and {len(diffs) - limit} more differences)" if len(diffs) > limit else ""
    return (f"thresher: the ranks built different {what} optimizers (every rank must build "
            f"the same model and pass the same settings): " + " | ".join(diffs[:limit]) + more)


# ----------------------------------------------------------------------------------------
# Hyper-parameter checks of the param groups
# ----------------------------------------------------------------------------------------


#: Hyper-parameters the optimizers keep per param group: (lo, hi, lo_open); all finite.
GROUP_RANGES = {
    "lr": (0.0, math.inf, False),
    "eps": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, False),
    "omega": (0.0, 1.0, False),
    "mu": (0.0, math.inf, True),
    "scale": (-math.inf, math.inf, False),
}


def check_group_hparams(opt) -> None:
    """Every hyper-parameter of GROUP_RANGES (and ``betas``) present in ``opt.defaults``
    (named as the argument) and in each param group (named ``param_groups[i]['lr']``)."""
    sources = [("", opt.defaults)] + [(f"param_groups[{i}]", g)
                                      for i, g in enumerate(opt.param_groups)]
    for where, values in sources:
        for key, (lo, hi, lo_open) in GROUP_RANGES.items():
            if key in values:
                v = values[key]
                if isinstance(v, torch.Tensor) and v.numel() == 1:  # torch allows a tensor lr
                    v = v.item()
                check_float(f"{where}[{key!r}]" if where else key, v, lo, hi, lo_open)
        if "betas" in values:
            check_betas(values["betas"], f"{where}['betas']" if where else "betas")


# ----------------------------------------------------------------------------------------
# The outer step (DiLoCo, SparseLoCo, LoRDO)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def outer_step_(p: torch.Tensor, anchor: torch.Tensor, delta: torch.Tensor, buf, *, lr: float,
                momentum: float, nesterov: bool) -> None:
    """One outer SGD step on the pseudo-gradient ``-delta`` (``delta`` = averaged
    ``theta^m - anchor``), torch.optim.SGD's momentum convention (``buf = m buf + g``;
    Nesterov: ``d = g + m buf``), then the anchor moves to the result. lr 1 and no momentum
    is plain averaging: ``p = anchor + delta``."""
    g = delta.neg()
    if momentum:
        buf.mul_(momentum).add_(g)
        d = g.add(buf, alpha=momentum) if nesterov else buf
    else:
        d = g
    p.copy_(anchor.sub(d, alpha=lr) if lr != 1.0 else anchor.sub(d))
    anchor.copy_(p)
