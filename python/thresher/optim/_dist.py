"""Shared machinery of the distributed optimizers (LoRDO, DDPAdamW, LowRankDDP, DiLoCo,
SparseLoCo): the process group and its timeout, collectives that cannot hang, exact byte
accounting, the AdamW arithmetic every method reuses, and checkpoint helpers.

Byte accounting. ``opt.comm_bytes`` is the *payload one rank contributes* to the collectives
it issued, summed over the run: ``numel * element_size`` for an all-reduce of a dense buffer
(a ring all-reduce moves ``2 (M-1)/M`` times that over the wire; the payload is the
topology-free number the papers compare); compressed messages are counted by
``thresher.comm`` (the packed bytes + a 16-byte header per tensor). Nothing is counted when
the world has one rank, because no collective is issued.

Timeouts. Every collective is issued with ``async_op=True`` and waited for with
``work.wait(timeout)``; a peer that died (connection reset) or never arrives turns into a
:class:`CollectiveError` on the survivors that names the operation, the rank and the timeout,
instead of a hang (``thresher.comm``'s compressed collectives raise its ``CommError``).
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveError",
    "DistMixin",
    "DistOptimizer",
    "GroupInfo",
    "resolve_group",
    "all_reduce_mean_",
    "adamw_update_",
    "clip_coef",
    "outer_step_",
    "atomic_save",
    "rng_state",
    "set_rng_state",
    "check_positive_int",
    "check_float",
]

DEFAULT_TIMEOUT_S = 300.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer rank died, or did not reach it in time."""


class GroupInfo:
    """The process group an optimizer talks to: ``rank``, ``world`` (1 when torch.distributed
    is not initialised: a single process, no collective is issued) and the timeout."""

    def __init__(self, group, rank: int, world: int, timeout_s: float):
        self.group, self.rank, self.world, self.timeout_s = group, rank, world, timeout_s

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def resolve_group(process_group=None, timeout: float | None = None) -> GroupInfo:
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return GroupInfo(None, 0, 1, float(timeout))
    return GroupInfo(process_group, dist.get_rank(process_group),
                     dist.get_world_size(process_group), float(timeout))


def _wait(work, what: str, info: GroupInfo) -> None:
    try:
        ok = work.wait(info.timeout)
    except Exception as exc:  # gloo raises RuntimeError / DistBackendError on a dead peer
        raise CollectiveError(
            f"thresher: {what} failed on rank {info.rank} of {info.world}: a peer rank died or "
            f"did not reach the collective within the {info.timeout_s:g} s timeout "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if ok is False:
        raise CollectiveError(f"thresher: {what} did not complete on rank {info.rank} of "
                              f"{info.world} within the {info.timeout_s:g} s timeout")


def all_reduce_mean_(tensors: Sequence[torch.Tensor], info: GroupInfo, what: str = "all_reduce") -> int:
    """Replaces every tensor by its mean over the ranks, in one collective (the tensors are
    flattened into one buffer of their common dtype). Returns the payload bytes sent."""
    tensors = [t for t in tensors if t.numel()]
    if info.world == 1 or not tensors:
        return 0
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        # one buffer per dtype keeps each collective exact in its own precision
        total = 0
        for dt in {t.dtype for t in tensors}:
            total += all_reduce_mean_([t for t in tensors if t.dtype == dt], info, what)
        return total
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _wait(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=info.group, async_op=True),
          f"{what} of {flat.numel() * flat.element_size()} bytes", info)
    flat.div_(info.world)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n
    return flat.numel() * flat.element_size()


def barrier(info: GroupInfo, what: str = "barrier") -> None:
    if info.world > 1:
        _wait(dist.barrier(group=info.group, async_op=True), what, info)


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
        self.dist = resolve_group(process_group, timeout)
        self._counters = {k: 0 for k in self._counter_names}

    @property
    def comm_bytes(self) -> int:
        """Payload bytes this rank has sent since construction (see the module docstring)."""
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


class DistOptimizer(DistMixin, torch.optim.Optimizer):
    """A torch.optim.Optimizer with the distributed mixin (LoRDO)."""

    def __init__(self, params, defaults, *, process_group=None, timeout=None):
        torch.optim.Optimizer.__init__(self, params, defaults)
        self._dist_init(process_group, timeout)


# ----------------------------------------------------------------------------------------
# Validation and checkpoint helpers
# ----------------------------------------------------------------------------------------


def check_positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def check_float(name: str, v, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not (lo < v if lo_open else lo <= v) or not v <= hi or math.isnan(v):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (check_float("betas[0]", betas[0], 0.0, 1.0), check_float("betas[1]", betas[1], 0.0, 1.0))


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save through thresher.data's atomic writer (temporary file beside the target,
    fsync, rename): a crash leaves the old checkpoint or the new one, never half of one."""
    from thresher.data.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """torch's CPU (and, when present, CUDA) generator states, as uint8 tensors."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def free_port() -> int:
    """A free TCP port on loopback (for local process groups)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
