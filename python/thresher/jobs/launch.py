"""Running one function on every rank: spawned local gloo ranks, or the ranks of a torchrun.

``run_on_ranks(fn, nproc, timeout, *args)`` calls ``fn(rank, world, *args)`` on each rank
inside an initialised process group and returns rank 0's (JSON) result. Under torchrun
(``RANK``/``WORLD_SIZE`` set) this process is one rank of the env:// group (NCCL with CUDA,
else gloo); a group the caller already initialised is used as it is. Otherwise ``nproc``
ranks are spawned on loopback; a bad input found by a rank comes back as one ``JobError``.
"""
from __future__ import annotations

import datetime
import json
import os
import time

__all__ = ["run_on_ranks", "under_torchrun", "in_group"]

# errors a rank reports as one line (bad input), like the launcher's own
_USER_ERRORS = ("ValueError", "TypeError", "FileNotFoundError", "PermissionError", "ImportError",
                "JobError")


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def in_group() -> bool:
    """Whether :func:`run_on_ranks` runs this process as one rank of a group (torchrun's, or
    one the caller initialised) rather than spawning the ranks."""
    import torch.distributed as dist

    return under_torchrun() or dist.is_initialized()


def _exit_with_parent(parent: int) -> None:
    """A spawned rank must not outlive its launcher (killed, or dead of a signal): a daemon
    thread ends the rank once its parent is gone."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def _spawned(rank, world, port, timeout, fn, args, queue, parent):
    import torch.distributed as dist

    _exit_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, *args)
        dist.destroy_process_group()
        queue.put((rank, "ok", json.dumps(result)))
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launcher says it once
        raise SystemExit(130)
    except BaseException as exc:
        import traceback

        if type(exc).__name__ in _USER_ERRORS:
            queue.put((rank, "user", f"{exc}"))
        else:
            queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def _in_group(fn, timeout, args, before=None):
    """This process is one rank of a group (torchrun's, or one the caller initialised)."""
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if before is not None and rank == 0:
        before()
    if before is not None:
        from thresher.comm.collectives import barrier, resolve_group

        barrier(resolve_group(None, timeout), "preparation barrier")
    result = fn(rank, world, *args)
    if owned:
        dist.destroy_process_group()
    return result


def run_on_ranks(fn, nproc: int, timeout: float, *args, before=None, name: str = "job"):
    """``fn(rank, world, *args)`` on every rank; returns rank 0's result. ``before()`` runs
    once before the ranks start (under torchrun: on rank 0, behind a barrier). ``fn`` and
    ``args`` must pickle when ``nproc > 1`` (the ranks are spawned)."""
    if in_group():
        return _in_group(fn, timeout, args, before)
    if before is not None:
        before()
    if nproc == 1:
        return fn(0, 1, *args)
    import torch.multiprocessing as mp

    from thresher.comm.collectives import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_spawned,
                         args=(r, nproc, port, timeout, fn, args, queue, os.getpid()))
             for r in range(nproc)]
    results = {}
    try:
        for p in procs:
            p.start()
        while len(results) < nproc:
            if not queue.empty():
                rank, status, out = queue.get()
                results[rank] = (status, out)
                if status != "ok":
                    break
            elif not any(p.is_alive() for p in procs) and queue.empty():
                break
            else:
                time.sleep(0.1)
    except BaseException:  # Ctrl-C or a kill of the launcher: the ranks stop with it
        started = [p for p in procs if p.pid is not None]  # (a start can fail: an unpicklable arg)
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        raise
    # after a rank failed, the others are stuck in a collective: give them a moment, not the timeout
    failed = any(status != "ok" for status, _ in results.values())
    deadline = time.monotonic() + (10 if failed else timeout + 30)
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    while not queue.empty():
        rank, status, out = queue.get()
        results[rank] = (status, out)
    user = [f"rank {r}: {o}" for r, (s, o) in sorted(results.items()) if s == "user"]
    if user:  # a bad input found by a rank: one line, like the launcher's own checks
        from thresher.jobs.config import JobError

        raise JobError(user[0])
    errors = [f"rank {r}: {o}" for r, (s, o) in sorted(results.items()) if s == "error"]
    if errors or 0 not in results:
        raise RuntimeError(f"thresher {name} failed:\n" + ("\n".join(errors) or
                                                          "rank 0 returned nothing"))
    return json.loads(results[0][1])
