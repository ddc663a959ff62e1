"""thresher's collectives over ``torch.distributed``: one error type (``CollectiveError``), one
default timeout (``DEFAULT_TIMEOUT_S``), one way of waiting, used by ``thresher.comm`` and by
every optimizer in ``thresher.optim``. Dense collectives (``all_reduce_mean_``,
``broadcast_``) coalesce their tensors into one buffer per dtype;
``sparse_all_gather_mean`` averages the ranks' compressed messages, and ``CommStats`` counts
what this rank sent. Timeouts, the two-all_gather protocol and the byte accounting:
docs/communication.md ("Collectives").
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .codecs import Packed

__all__ = [
    "CollectiveError",
    "CommError",
    "CommStats",
    "DEFAULT_TIMEOUT_S",
    "GroupInfo",
    "HEADER_BYTES",
    "all_gather",
    "all_reduce_mean_",
    "barrier",
    "broadcast_",
    "check_timeout",
    "resolve_group",
    "sparse_all_gather_mean",
]

HEADER_BYTES = 16
DEFAULT_TIMEOUT_S = 300.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out (a peer rank died, or did not reach it in time), or
    the peers sent messages that do not match."""


#: The name ``thresher.comm`` used for the same error (one type, two names).
CommError = CollectiveError


def check_timeout(timeout) -> float:
    """``timeout`` in seconds (None: ``DEFAULT_TIMEOUT_S``) as a positive finite float."""
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    return float(timeout)


class GroupInfo:
    """The process group a caller talks to: ``rank``, ``world`` (1 when torch.distributed
    is not initialised: a single process, no collective is issued) and the timeout."""

    def __init__(self, group, rank: int, world: int, timeout_s: float):
        self.group, self.rank, self.world, self.timeout_s = group, rank, world, timeout_s

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    @property
    def device(self) -> torch.device:
        """Where small control tensors (headers, fingerprints) live: NCCL only moves CUDA
        tensors, the other backends take CPU ones."""
        if self.world > 1 and "nccl" in str(dist.get_backend(self.group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def resolve_group(process_group=None, timeout: float | None = None, *,
                  arg: str = "process_group") -> GroupInfo:
    """The group (None: the default one) with its rank, world size and checked timeout;
    ``arg`` is the caller's name for the group argument (for the error message)."""
    timeout = check_timeout(timeout)
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(f"{arg} was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return GroupInfo(None, 0, 1, timeout)
    return GroupInfo(process_group, dist.get_rank(process_group),
                     dist.get_world_size(process_group), timeout)


def _wait(work, what: str, info: GroupInfo) -> None:
    try:
        ok = work.wait(info.timeout)
    except Exception as exc:  # gloo/nccl raise RuntimeError / DistBackendError on a dead peer
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CollectiveError(
            f"thresher: {what} failed on rank {info.rank} of {info.world}: a peer rank died or "
            f"did not reach the collective within the {info.timeout_s:g} s timeout "
            f"({type(exc).__name__}: {first})") from exc
    if ok is False:
        raise CollectiveError(f"thresher: {what} did not complete on rank {info.rank} of "
                              f"{info.world} within the {info.timeout_s:g} s timeout")


def all_gather(t: Tensor, info: GroupInfo, what: str = "all_gather") -> list[Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
    if info.world == 1:
        return [t]
    bufs = [torch.empty_like(t) for _ in range(info.world)]
    _wait(dist.all_gather(bufs, t.contiguous(), group=info.group, async_op=True), what, info)
    return bufs


def _coalesced(tensors: Sequence[Tensor], fn: Callable[[Tensor], None]) -> int:
    """Runs ``fn`` on one flat buffer per dtype (dtypes in order of first appearance, the
    same on every rank) and copies the result back; returns the buffers' bytes."""
    tensors = [t for t in tensors if t.numel()]
    total = 0
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        fn(flat)
        off = 0
        for t in same:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n
        total += flat.numel() * flat.element_size()
    return total


def all_reduce_mean_(tensors: Sequence[Tensor], info: GroupInfo, what: str = "all_reduce") -> int:
    """Replaces every tensor by its mean over the ranks (one collective per dtype, each exact
    in its own precision). Returns the payload bytes sent (0 for a world of one)."""
    if info.world == 1:
        return 0

    def reduce(flat):
        _wait(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=info.group, async_op=True),
              f"{what} of {flat.numel() * flat.element_size()} bytes", info)
        flat.div_(info.world)

    return _coalesced(tensors, reduce)


def broadcast_(tensors: Sequence[Tensor], info: GroupInfo, what: str = "broadcast") -> int:
    """Overwrites every tensor with rank 0's (of the group; one collective per dtype).
    Returns the payload bytes (0 for a world of one)."""
    if info.world == 1:
        return 0
    src = 0 if info.group is None else dist.get_global_rank(info.group, 0)

    def bcast(flat):
        _wait(dist.broadcast(flat, src=src, group=info.group, async_op=True),
              f"{what} of {flat.numel() * flat.element_size()} bytes", info)

    return _coalesced(tensors, bcast)


def barrier(info: GroupInfo, what: str = "barrier") -> None:
    if info.world > 1:
        _wait(dist.barrier(group=info.group, async_op=True), what, info)


# ----------------------------------------------------------------------------------------
# Compressed messages
# ----------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes and messages this rank sent, in total and per kind of collective."""

    bytes_sent: int = 0
    messages: int = 0
    by_kind: dict = field(default_factory=dict)

    def record(self, nbytes: int, kind: str = "all_gather") -> None:
        nbytes = int(nbytes)
        self.bytes_sent += nbytes
        self.messages += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    def reset(self) -> None:
        self.bytes_sent, self.messages, self.by_kind = 0, 0, {}

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "messages": self.messages, "by_kind": dict(self.by_kind)}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent = int(state["bytes_sent"])
        self.messages = int(state["messages"])
        self.by_kind = dict(state["by_kind"])


def sparse_all_gather_mean(packed: Packed, group=None, out: Tensor | None = None,
                           timeout: float = DEFAULT_TIMEOUT_S,
                           stats: CommStats | None = None) -> Tensor:
    """The mean over ranks of the decoded messages (docs/communication.md). Returns a
    tensor shaped and typed like the encoded one, or, with ``out``, adds the mean into
    ``out`` and returns it. Works (no collective) when torch.distributed is not initialised."""
    if not isinstance(packed, Packed):
        raise TypeError(f"packed must be a thresher.comm.Packed, got {type(packed).__name__}")
    info = resolve_group(group, timeout, arg="group")
    codec = packed.codec
    if info.world == 1:
        return codec.decode(packed, out=out)
    dev = packed.data.device
    header = torch.tensor([packed.nbytes, codec.fingerprint(packed.shape)], dtype=torch.int64,
                          device=dev)
    heads = torch.stack(all_gather(header, info, "all_gather (header)")).cpu()
    if not bool((heads == heads[0]).all()):
        raise CollectiveError(
            f"thresher: ranks encoded different things (payload bytes and codec/shape "
            f"fingerprints per rank: {heads.tolist()}); every rank must use the same codec "
            f"settings on the same tensor shape")
    msgs = all_gather(packed.data, info, f"all_gather of {packed.nbytes} payload bytes")
    if stats is not None:
        stats.record(HEADER_BYTES + packed.nbytes, "all_gather")
    n = packed.numel
    acc = torch.zeros(n, dtype=torch.float32, device=dev)
    count = torch.zeros(n, dtype=torch.int32, device=dev) if codec.sparse else None
    for m in msgs:
        codec.decode(Packed(m, packed.shape, packed.dtype, codec), out=acc, count=count)
    if codec.sparse:
        mean = torch.where(count > 0, acc / count.clamp_min(1), torch.zeros_like(acc))
    else:
        mean = acc / info.world
    if out is None:
        return mean.view(packed.shape).to(packed.dtype)
    if out.numel() != n:
        raise ValueError(f"out must have {n} elements, got {out.numel()}")
    out.add_(mean.view(out.shape).to(out.dtype))
    return out


def free_port() -> int:
    """A free TCP port on loopback (for local process groups)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
