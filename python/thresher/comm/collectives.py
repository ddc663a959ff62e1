"""Collectives over ``torch.distributed`` for compressed tensors, and exact byte accounting.

``sparse_all_gather_mean(packed, group=None, out=None, timeout=300.0, stats=None)``: every
rank contributes its message; each rank decodes all of them and returns the mean. For a
sparse codec (top-k) the mean at each index is over the ranks that sent that index
(SparseLoCo's aggregation); for dense codecs it is over all ranks.

Protocol (two all_gathers, each issued asynchronously and waited for with the timeout, so a
dead or missing rank raises :class:`CommError` instead of hanging):

1. a 16-byte header ``[payload bytes, fingerprint of (codec settings, shape)]`` -- every
   rank checks that all peers encoded the same thing the same way;
2. the payloads (equal sizes by then).

``CommStats`` counts what this rank sent: ``bytes_sent`` = header + payload bytes per call,
i.e. the payload one rank contributes (an all_gather then delivers it to world-1 peers; the
wire total of a ring all_gather is ``(world-1) x`` that per rank). Nothing is counted for a
world of one (no collective is issued).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .codecs import Packed

__all__ = ["CommError", "CommStats", "sparse_all_gather_mean", "HEADER_BYTES"]

HEADER_BYTES = 16
DEFAULT_TIMEOUT_S = 300.0


class CommError(RuntimeError):
    """A collective failed or timed out (a peer died or never arrived), or peers disagree."""


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


def _wait(work, what: str, rank: int, world: int, timeout_s: float) -> None:
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # gloo/nccl raise on a dead peer or a timeout
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CommError(f"thresher.comm: {what} failed on rank {rank} of {world}: a peer died or "
                        f"did not arrive within {timeout_s:g} s ({type(exc).__name__}: {first})") from exc
    if ok is False:
        raise CommError(f"thresher.comm: {what} did not complete on rank {rank} of {world} "
                        f"within {timeout_s:g} s")


def _all_gather(t: Tensor, group, what, rank, world, timeout_s) -> list[Tensor]:
    bufs = [torch.empty_like(t) for _ in range(world)]
    _wait(dist.all_gather(bufs, t, group=group, async_op=True), what, rank, world, timeout_s)
    return bufs


def sparse_all_gather_mean(packed: Packed, group=None, out: Tensor | None = None,
                           timeout: float = DEFAULT_TIMEOUT_S,
                           stats: CommStats | None = None) -> Tensor:
    """The mean over ranks of the decoded messages (see the module docstring). Returns a
    tensor shaped and typed like the encoded one, or, with ``out``, adds the mean into
    ``out`` and returns it. Works (no collective) when torch.distributed is not initialised."""
    if not isinstance(packed, Packed):
        raise TypeError(f"packed must be a thresher.comm.Packed, got {type(packed).__name__}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    codec = packed.codec
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return codec.decode(packed, out=out)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        return codec.decode(packed, out=out)
    dev = packed.data.device
    header = torch.tensor([packed.nbytes, codec.fingerprint(packed.shape)], dtype=torch.int64,
                          device=dev)
    heads = _all_gather(header, group, "all_gather (header)", rank, world, timeout)
    heads = torch.stack(heads).cpu()
    if not bool((heads == heads[0]).all()):
        raise CommError(f"thresher.comm: ranks encoded different things (payload bytes and "
                        f"codec/shape fingerprints per rank: {heads.tolist()}); every rank must "
                        f"use the same codec settings on the same tensor shape")
    msgs = _all_gather(packed.data.contiguous(), group,
                       f"all_gather of {packed.nbytes} payload bytes", rank, world, timeout)
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
        mean = acc / world
    if out is None:
        return mean.view(packed.shape).to(packed.dtype)
    if out.numel() != n:
        raise ValueError(f"out must have {n} elements, got {out.numel()}")
    out.add_(mean.view(out.shape).to(out.dtype))
    return out
