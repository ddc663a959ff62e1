"""Helpers for tests/optim: real gloo process groups on loopback, spawned with
torch.multiprocessing, and the tiny model + data every optimizer test uses.

Worker functions live here (not in the test files) because spawned children import them by
module name; the parent puts this folder on sys.path, which spawn passes to the children.
"""
from __future__ import annotations

import datetime
import io
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thresher.comm.collectives import free_port

# ----------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """Two matrices on opposite GaLore sides (6x5 -> "right", 3x6 -> "left") and a bias."""

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(6, 5, generator=g, dtype=dtype) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(3, 6, generator=g, dtype=dtype) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype) * 0.1)

    def forward(self, x):
        return torch.tanh(x @ self.w1.T) @ self.w2.T + self.b


def loss_fn(params: dict, x, y):
    """The same loss as TinyNet, written on a dict of tensors (the tests' transcription)."""
    out = torch.tanh(x @ params["w1"].T) @ params["w2"].T + params["b"]
    return (out - y).pow(2).mean()


def batch(rank: int, step: int, dtype=torch.float64):
    """A fixed batch per (rank, step): ranks see different data."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(8, 5, generator=g, dtype=dtype)
    y = torch.randn(8, 3, generator=g, dtype=dtype)
    return x, y


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def train(model, opt, rank: int, steps: range, dtype=torch.float64, data_rank=None):
    """Runs opt over the given step numbers; returns the flat parameters after each step."""
    traj = []
    for t in steps:
        x, y = batch(rank if data_rank is None else data_rank, t, dtype)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        traj.append(flat(model))
    return torch.stack(traj)


# ----------------------------------------------------------------------------------------
# Process groups
# ----------------------------------------------------------------------------------------


def _entry(rank, world, port, fn, args, queue, timeout):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world, *args)
        # plain bytes through the queue: torch's shared-memory tensor pickling would need
        # this process alive when the parent unpickles
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, "ok", buf.getvalue()))
        dist.destroy_process_group()
    except BaseException as exc:  # report, do not hang the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_ranks(fn, world: int, *args, timeout: float = 30.0, wait: float = 120.0,
              allow_missing=()):
    """Starts ``world`` gloo ranks running ``fn(rank, world, *args)``; returns the list of
    their return values (rank order). A rank in ``allow_missing`` may die without a result."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, timeout))
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + wait
    expected = world - len(allow_missing)
    while len(results) < expected and time.monotonic() < deadline:
        if not queue.empty():
            rank, status, out = queue.get()
            results[rank] = (status, out)
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    while not queue.empty():
        rank, status, out = queue.get()
        results[rank] = (status, out)
    missing = [r for r in range(world) if r not in results and r not in allow_missing]
    if missing:
        raise RuntimeError(f"ranks {missing} returned nothing")
    errors = {r: o for r, (s, o) in results.items() if s == "error"}
    if errors:
        raise RuntimeError("\n".join(f"rank {r}: {o}" for r, o in errors.items()))
    return [torch.load(io.BytesIO(results[r][1]), weights_only=False) if r in results else None
            for r in range(world)]


class Pool:
    """``world`` gloo ranks started once and reused by every test in the pytest process
    (starting a rank costs a torch import, seconds on a loaded machine). ``run(fn, *args)``
    runs ``fn(rank, world, *args)`` on every rank and returns their results; a test that
    kills a rank uses :func:`run_ranks` instead."""

    def __init__(self, world: int, timeout: float = 30.0):
        ctx = mp.get_context("spawn")
        self.world, self.timeout = world, timeout
        self.tasks = [ctx.SimpleQueue() for _ in range(world)]
        self.results = ctx.SimpleQueue()
        port = free_port()
        self.procs = [ctx.Process(target=_pool_entry, daemon=True,
                                  args=(r, world, port, self.tasks[r], self.results, timeout))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, wait: float = 120.0):
        for q in self.tasks:
            q.put((fn, args))
        results, deadline = {}, time.monotonic() + wait
        while len(results) < self.world:
            if time.monotonic() > deadline or not all(p.is_alive() for p in self.procs):
                self.close()
                raise RuntimeError(f"pool ranks did not answer (got {sorted(results)})")
            if self.results.empty():
                time.sleep(0.02)
                continue
            rank, status, out = self.results.get()
            results[rank] = (status, out)
        errors = {r: o for r, (s, o) in results.items() if s == "error"}
        if errors:
            raise RuntimeError("\n".join(f"rank {r}: {o}" for r, o in errors.items()))
        return [torch.load(io.BytesIO(results[r][1]), weights_only=False) for r in range(self.world)]

    def close(self):
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def _pool_entry(rank, world, port, tasks, results, timeout):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            buf = io.BytesIO()
            torch.save(fn(rank, world, *args), buf)
            results.put((rank, "ok", buf.getvalue()))
        except BaseException as exc:
            results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


_POOLS: dict = {}


def pool(world: int = 2) -> Pool:
    """The shared pool of ``world`` ranks (started on first use, closed at exit)."""
    if world not in _POOLS:
        import atexit

        _POOLS[world] = Pool(world)
        atexit.register(_POOLS[world].close)
    return _POOLS[world]


# ----------------------------------------------------------------------------------------
# Worker functions (run in each rank)
# ----------------------------------------------------------------------------------------

LORDO_CFG = dict(lr=0.05, rank=2, sync_every=3, omega=0.4, mu=1.5, clip=0.5, betas=(0.9, 0.99),
                 eps=1e-8, weight_decay=0.1, outer="nesterov", outer_lr=0.7,
                 outer_momentum=0.9, proj="svd", init_proj="grad")


def make_opt(method: str, params, **kw):
    from thresher.optim.ddp import DDPAdamW, LowRankDDP
    from thresher.optim.diloco import DiLoCo, SparseLoCo
    from thresher.optim.lordo import LoRDO

    cls = dict(lordo=LoRDO, ddp=DDPAdamW, lowrank_ddp=LowRankDDP, diloco=DiLoCo,
               sparseloco=SparseLoCo)[method]
    return cls(params, **kw)


def w_trajectory(rank, world, method, kw, steps, dtype=torch.float64, identical=False):
    """Trains TinyNet with one optimizer; returns (trajectory, comm_bytes, step counters)."""
    model = TinyNet(dtype)
    opt = make_opt(method, model.parameters(), **kw)
    traj = train(model, opt, rank, range(1, steps + 1), dtype, data_rank=0 if identical else None)
    return traj, opt.comm_bytes, {k: int(v) for k, v in opt.state_dict()["thresher"].items()}


def w_checkpoint(rank, world, method, kw, k, path, phase):
    """phase "first": an uninterrupted run of 2k steps, then a fresh run of k steps that saves
    a checkpoint. "resume": load it (weights_only) and run steps k+1..2k. The data come from
    the global RNG, so the checkpoint must carry the RNG state too. Returns the final flat
    parameters and comm_bytes."""
    from thresher.core.files import atomic_save
    from thresher.core.rng import rng_state, set_rng_state

    def fresh():
        torch.manual_seed(100 + rank)
        model = TinyNet(torch.float32)
        return model, make_opt(method, model.parameters(), **kw)

    def run(model, opt, n):
        for _ in range(n):
            x, y = torch.randn(8, 5), torch.randn(8, 3)
            opt.zero_grad(set_to_none=True)
            (model(x) - y).pow(2).mean().backward()
            opt.step()
        return flat(model), opt.comm_bytes

    model, opt = fresh()
    if phase == "first":
        full = run(model, opt, 2 * k)
        model, opt = fresh()
        run(model, opt, k)
        atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state()},
                    f"{path}/rank{rank}.pt")
        return full
    ck = torch.load(f"{path}/rank{rank}.pt", weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    set_rng_state(ck["rng"])
    return run(model, opt, k)


def check_resume(method, kw, k, path):
    """Checkpoint at k, drop every object, resume from the file: equal to 2k uninterrupted."""
    full = pool().run(w_checkpoint, method, kw, k, str(path), "first")
    resumed = pool().run(w_checkpoint, method, kw, k, str(path), "resume")
    for (a, ba), (b, bb) in zip(full, resumed):
        assert torch.equal(a, b)
        assert ba == bb


def w_dead_rank(rank, world, method, kw):
    """Rank 1 dies after one step; the others must raise CollectiveError at the first sync."""
    from thresher.optim._dist import CollectiveError

    model = TinyNet(torch.float32)
    opt = make_opt(method, model.parameters(), **kw)
    x, y = batch(rank, 0, torch.float32)
    for t in range(4):
        if rank == 1 and t == 1:
            os._exit(3)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        start = time.monotonic()
        try:
            opt.step()
        except CollectiveError as exc:
            return ("CollectiveError", str(exc), time.monotonic() - start)
    return ("no error", "", 0.0)


def w_construct(rank, world, method, kws, nets, steps=0):
    """Builds ``method`` with ``kws[rank]`` on a TinyNet changed by ``nets[rank]`` (keys:
    ``dtype``, ``seed``, ``w1`` (a shape for the first matrix), ``extra`` (one more
    parameter)), then runs ``steps`` steps. Returns ("ok", flat params after construction,
    trajectory) or (the error's type name, its message)."""
    spec = nets[rank]
    model = TinyNet(spec.get("dtype", torch.float64), seed=spec.get("seed", 0))
    if "w1" in spec:
        model.w1 = torch.nn.Parameter(torch.randn(*spec["w1"], dtype=model.w1.dtype))
    if spec.get("extra"):
        model.extra = torch.nn.Parameter(torch.zeros(2, dtype=model.w1.dtype))
    try:
        opt = make_opt(method, model.parameters(), **kws[rank])
    except Exception as exc:  # noqa: BLE001 - the test inspects which error it was
        return (type(exc).__name__, str(exc))
    start = flat(model)
    return ("ok", start, train(model, opt, rank, range(1, steps + 1)) if steps else None)


def w_construct_without_peer(rank, world, method, kw):
    """Rank 1 dies before building its optimizer; rank 0's constructor must raise
    CollectiveError (the agreement check waits with the timeout), not hang."""
    from thresher.optim._dist import CollectiveError

    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        make_opt(method, TinyNet().parameters(), **kw)
    except CollectiveError as exc:
        return ("CollectiveError", str(exc), time.monotonic() - start)
    return ("no error", "", 0.0)


def w_count_construction_collectives(rank, world, method, kws):
    """Builds ``method`` with ``kws[rank]`` while counting the collectives issued; returns
    (the error type or "ok", [(collective, payload bytes), ...])."""
    calls = []
    real = {name: getattr(dist, name) for name in ("all_gather", "broadcast", "all_reduce")}

    def counting(name):
        def wrapper(*args, **kw):
            t = args[1] if name == "all_gather" else args[0]
            calls.append((name, t.numel() * t.element_size()))
            return real[name](*args, **kw)
        return wrapper

    for name in real:
        setattr(dist, name, counting(name))
    try:
        make_opt(method, TinyNet().parameters(), **kws[rank])
        kind = "ok"
    except ValueError:
        kind = "ValueError"
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return kind, calls
