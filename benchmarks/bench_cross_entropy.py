#!/usr/bin/env python
"""Benchmark of the weighted cross-entropy op family (thresher.ops.cross_entropy).

Two ops, each swept one axis at a time around a base point (N = 4096 tokens, V = 32000,
fp32): N in {1024, 4096, 16384}, V in {32000, 50257, 128256}, then bf16 at the base shape
(``--full-grid``: every dtype at every shape); forward-only and forward+backward throughout.
Groups estimated slower than ``--max-call-s`` per call (the big linear shapes on a small
CPU) or bigger than ``--mem-limit-gb`` are listed as skipped, with the reason.

* ``weighted_ce``: ``thresher.weighted_cross_entropy(logits, target, sample_weight=w)``
  against eager PyTorch ``(F.cross_entropy(logits, target, reduction="none") * w).sum() /
  w.sum()``, ``torch.compile`` of that same function, Liger-Kernel's ``LigerCrossEntropyLoss``
  (Triton, CUDA only; unweighted) and cut-cross-entropy (which has no logits-input entry
  point; reported as n/a with the reason).
* ``linear_weighted_ce`` (H = 512): ``thresher.linear_weighted_cross_entropy`` against eager
  (materialised ``hidden @ W.T`` then the eager weighted CE), ``torch.compile`` of it, and --
  unweighted, since they take no per-sample weight -- PyTorch's ``F.linear_cross_entropy``
  (default reference path and its chunked ``LinearCrossEntropyOptions`` path) and
  cut-cross-entropy (Triton ``cce``; its CPU-capable ``torch_compile`` path at the base
  shape) and Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA only); thresher
  without weights joins them in the headline.

On CUDA (``--device cuda``) rows also give the fraction of the device's datasheet peak
(``_common.device_peaks``): HBM bandwidth for weighted_ce (byte model below), dense bf16
FLOP/s for the linear op. benchmarks/gpu_check.sh runs it as ``--device cuda --only ce|linear
--dtype bf16 --n 8192 --v 32000 128256 --modes fwd+bwd --memory inprocess --no-headline``.

Headline (``--headline`` runs only this; the full run ends with it): (a) weighted CE fp32
N=4096 V=32000 with sample weights, fwd+bwd: speedup vs eager (target >= 3x) and vs
torch.compile (>= 2x); (b) linear weighted CE fp32 N=8192 H=512 V=32000, fwd+bwd, thresher
unweighted vs F.linear_cross_entropy: peak memory <= 25% and time <= 1.1x (the chunked
options path is reported beside it). Then a GPU section: registers/spills of every Triton
kernel AOT-compiled for sm_80/sm_90 and H100 roofline times.

Modes: ``fwd`` is the loss under ``torch.no_grad()`` (scoring); ``fwd+bwd`` is the loss then
``torch.autograd.grad(loss, inputs)`` with inputs = logits, or hidden and W -- the same for
every implementation. Peak memory: each case alone in a fresh subprocess (``--memory
subprocess``, the default), above what is resident once its inputs exist. Timing: the
implementations of one shape run in this process, interleaved round-robin on the same
inputs, so the ratios between them survive a drifting machine load.

Examples::

    python benchmarks/bench_cross_entropy.py --quick        # < 1 min: README demo
    python benchmarks/bench_cross_entropy.py --headline     # the issue's two targets
    python benchmarks/bench_cross_entropy.py                # full sweep + headline
    python benchmarks/bench_cross_entropy.py --only ce --dtype fp32 --plan

Results: a Markdown table on stdout, CSV + JSON in ``--out`` (default ``bench-results/``).
CPU timings on small shared machines are noisy: read the ratios (speedup vs eager, memory
as % of a peer), which are measured in the same run.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCRIPT = Path(__file__).resolve()
NAME = "cross_entropy"

BASE_N, BASE_V, BASE_H = 4096, 32000, 512
N_AXIS = (1024, 4096, 16384)
V_AXIS = (32000, 50257, 128256)

# Implementations, by op. "weighted": whether the implementation applies the per-sample
# weights (the unweighted ones are compared with F.linear_cross_entropy, which has none).
# "thresher overwrite_logits": the same op writing the gradient over the logits (no fresh
# (N, V) gradient buffer, so none of its first-touch page faults); fwd+bwd only.
CE_IMPLS = ("thresher", "thresher overwrite_logits", "eager", "torch.compile",
            "cut-cross-entropy", "liger-kernel")
# ("thresher unweighted" runs in the headline only: in the sweep it would repeat "thresher")
LINEAR_IMPLS = ("thresher", "eager", "torch.compile", "F.linear_cross_entropy",
                "F.linear_cross_entropy chunked", "cce torch_compile", "cut-cross-entropy",
                "liger-kernel")
# Liger-Kernel's losses take a per-class weight, not a per-sample one: unweighted here.
UNWEIGHTED = {"thresher unweighted", "F.linear_cross_entropy", "F.linear_cross_entropy chunked",
              "cce torch_compile", "cut-cross-entropy", "liger-kernel"}
COMPILED = {"torch.compile", "cce torch_compile"}
# Run at the base shape only: cut-cross-entropy's CPU path is a torch.compile of the
# materialised logits, like the "torch.compile" row, and compiling costs a lot of the sweep.
BASE_ONLY = {"cce torch_compile"}
OP_NAMES = {"ce": "weighted_ce", "linear": "linear_weighted_ce"}

# Byte model of the memory-bound weighted CE (for GB/s and the fraction of copy bandwidth):
# the minimum traffic any implementation needs, counted like the copy benchmark (read +
# write). Forward: read the (N, V) logits once = N*V*elem. Forward+backward: read the logits
# once and write the (N, V) gradient once = 2*N*V*elem. O(N) traffic (target, weights, loss,
# lse) is ignored. Eager PyTorch moves several times this; the column shows how close each
# implementation gets to streaming the logits once at this machine's copy bandwidth.


def ce_bytes(n: int, v: int, elem: int, mode: str) -> int:
    return n * v * elem * (1 if mode == "fwd" else 2)


def linear_flops(n: int, h: int, v: int, mode: str) -> int:
    """LM-head GEMM FLOPs: 2NHV forward; backward adds dH = G W and dW = G^T H (3x total)."""
    return 2 * n * h * v * (1 if mode == "fwd" else 3)


class NotAvailable(Exception):
    """An implementation that cannot run here; the message is the reason."""


# ----------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------


def eager_weighted_ce(logits, target, w):
    return (F.cross_entropy(logits, target, reduction="none") * w).sum() / w.sum()


def eager_linear_weighted_ce(hidden, lm_weight, target, w):
    return eager_weighted_ce(hidden @ lm_weight.t(), target, w)


def _cce_module():
    try:
        import cut_cross_entropy
    except Exception as exc:  # noqa: BLE001
        raise NotAvailable("cut-cross-entropy is not installed "
                           f"(pip install --no-deps cut-cross-entropy): {exc}") from None
    return cut_cross_entropy


_CCE_TRITON_REASON: dict[str, str | None] = {}


def _liger():
    """Liger-Kernel's loss modules (Triton kernels: CUDA only)."""
    try:
        from liger_kernel.transformers import (LigerCrossEntropyLoss,
                                               LigerFusedLinearCrossEntropyLoss)
    except Exception as exc:  # noqa: BLE001
        raise NotAvailable("Liger-Kernel is not installed (pip install --no-deps "
                           f"liger-kernel): {type(exc).__name__}: {exc}"[:300]) from None
    return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def cce_triton_reason(device: torch.device) -> str | None:
    """None when cut-cross-entropy's Triton ``cce`` implementation runs on ``device``."""
    key = device.type
    if key not in _CCE_TRITON_REASON:
        try:
            cce = _cce_module()
            e = torch.randn(8, 16, device=device, requires_grad=True)
            c = torch.randn(32, 16, device=device)
            cce.linear_cross_entropy(e, c, torch.randint(0, 32, (8,), device=device),
                                     impl="cce").backward()
            _CCE_TRITON_REASON[key] = None
        except NotAvailable as exc:
            _CCE_TRITON_REASON[key] = str(exc)
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _CCE_TRITON_REASON[key] = (f"its Triton kernels do not run on {device.type} tensors "
                                       f"({type(exc).__name__}: {msg[:120]})")
    return _CCE_TRITON_REASON[key]


def unavailable(op: str, impl: str, device: torch.device) -> str | None:
    """Why an implementation cannot run here (checked once, at planning), else None."""
    try:
        if impl == "cut-cross-entropy" and op == "ce":
            _cce_module()
            return ("cut-cross-entropy has no logits-input entry point (only "
                    "linear_cross_entropy(e, c, targets), fused with the LM head); see the "
                    "linear_weighted_ce rows")
        if impl == "cut-cross-entropy":
            return cce_triton_reason(device)
        if impl == "liger-kernel":
            _liger()
            if device.type != "cuda":
                return f"Liger-Kernel's Triton kernels run on CUDA tensors, not {device.type}"
        if impl == "cce torch_compile":
            _cce_module()
        if impl.startswith("F.linear_cross_entropy") and not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no F.linear_cross_entropy"
        if impl.endswith("chunked") and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions"
    except NotAvailable as exc:
        return str(exc)
    return None


def make_inputs(op: str, dtype: torch.dtype, n: int, v: int, h: int, grad: bool,
                device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    w = (torch.rand(n, generator=g) + 0.5).to(device)  # sample weights in [0.5, 1.5)
    if op == "ce":
        logits = (torch.randn(n, v, generator=g) * 2.0).to(device=device, dtype=dtype)
        return {"logits": logits.requires_grad_(grad), "target": target, "w": w}
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    lm_weight = (torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))).to(device=device,
                                                                          dtype=dtype)
    return {"hidden": hidden.requires_grad_(grad), "lm_weight": lm_weight.requires_grad_(grad),
            "target": target, "w": w}


def build(op: str, impl: str, x: dict):
    """``(loss_fn, grad_inputs)`` for one implementation on the inputs ``x``."""
    import thresher

    if op == "ce":
        logits, target, w = x["logits"], x["target"], x["w"]
        grads = [logits]
        if impl == "thresher":
            return (lambda: thresher.weighted_cross_entropy(logits, target, sample_weight=w)), grads
        if impl in ("thresher overwrite_logits", "liger-kernel"):
            # Both write the gradient over their input (Liger-Kernel always does), so each
            # gets its own copy of the logits (the group's other implementations share
            # theirs). Later calls see other values but do the same work; restore() puts
            # the logits back before the loss cross-check.
            own = logits.detach().clone().requires_grad_(logits.requires_grad)
            if impl == "liger-kernel":
                why = unavailable("ce", impl, logits.device)
                if why:
                    raise NotAvailable(why)
                liger = _liger()[0](reduction="mean")

                def loss_fn():
                    return liger(own, target)
            else:
                def loss_fn():
                    return thresher.weighted_cross_entropy(own, target, sample_weight=w,
                                                           overwrite_logits=True)

            loss_fn.restore = lambda: own.detach().copy_(logits.detach())
            return loss_fn, [own]
        if impl == "eager":
            return (lambda: eager_weighted_ce(logits, target, w)), grads
        if impl == "torch.compile":
            fn = torch.compile(eager_weighted_ce, dynamic=False)
            return (lambda: fn(logits, target, w)), grads
        if impl == "cut-cross-entropy":
            raise NotAvailable(unavailable("ce", impl, logits.device))
        raise ValueError(impl)
    hidden, lm_weight, target, w = x["hidden"], x["lm_weight"], x["target"], x["w"]
    grads = [hidden, lm_weight]
    if impl == "thresher":
        return (lambda: thresher.linear_weighted_cross_entropy(hidden, lm_weight, target,
                                                               sample_weight=w)), grads
    if impl == "thresher unweighted":
        return (lambda: thresher.linear_weighted_cross_entropy(hidden, lm_weight, target)), grads
    if impl == "eager":
        return (lambda: eager_linear_weighted_ce(hidden, lm_weight, target, w)), grads
    if impl == "torch.compile":
        fn = torch.compile(eager_linear_weighted_ce, dynamic=False)
        return (lambda: fn(hidden, lm_weight, target, w)), grads
    if impl in ("F.linear_cross_entropy", "F.linear_cross_entropy chunked"):
        why = unavailable("linear", impl, hidden.device)
        if why:
            raise NotAvailable(why)
        # options=None: the reference path (materialised logits); LinearCrossEntropyOptions():
        # the chunked path with its per-(device, dtype) automatic chunk size and policy
        opts = torch.nn.LinearCrossEntropyOptions() if impl.endswith("chunked") else None
        return (lambda: F.linear_cross_entropy(hidden, lm_weight, target, reduction="mean",
                                               options=opts)), grads
    if impl == "cce torch_compile":
        cce = _cce_module()
        return (lambda: cce.linear_cross_entropy(hidden, lm_weight, target,
                                                 impl="torch_compile")), grads
    if impl == "cut-cross-entropy":
        reason = cce_triton_reason(hidden.device)
        if reason:
            raise NotAvailable(reason)
        cce = _cce_module()
        return (lambda: cce.linear_cross_entropy(hidden, lm_weight, target, impl="cce")), grads
    if impl == "liger-kernel":
        why = unavailable("linear", impl, hidden.device)
        if why:
            raise NotAvailable(why)
        fn = _liger()[1](reduction="mean")
        # by keyword: its forward takes (lin_weight, _input, target), weight first
        return (lambda: fn(lin_weight=lm_weight, _input=hidden, target=target)), grads
    raise ValueError(impl)


def make_call(loss_fn, grad_inputs, mode: str):
    """fwd: loss under no_grad. fwd+bwd: loss, then autograd.grad w.r.t. the inputs."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return loss_fn()
    else:
        def call():
            loss = loss_fn()
            return loss.detach(), torch.autograd.grad(loss, grad_inputs)
    call.restore = getattr(loss_fn, "restore", lambda: None)
    return call


def _loss_of(result) -> float:
    return float((result[0] if isinstance(result, tuple) else result).float())


# ----------------------------------------------------------------------------------------
# Running cases. Two phases per group of cases sharing (op, dtype, N, V, H, mode):
#  1. memory (--memory subprocess): each case alone in a fresh child process: warm-up,
#     then one call with its peak memory (and its time, and the loss); with --memory
#     inprocess that call is made in phase 2 instead, before the rounds, and is a sample;
#  2. timing: all the group's implementations in this process on the same inputs,
#     interleaved round-robin (see _common.time_interleaved), so their ratios hold up
#     while the machine's load drifts. Cases planned with a single repeat (calls of many
#     seconds) take their one sample from phase 1 when it ran.
# ----------------------------------------------------------------------------------------


def _thresher_backend(device, dtype, v):
    from thresher.ops.cross_entropy import DISPATCH

    return DISPATCH.select("auto", device, dtype, vocab=v)


def prepare(spec: dict, x: dict | None = None):
    """Builds the case's call on inputs ``x`` (made here when None) and warms it up.
    Compiled implementations compile for this exact shape, so they warm up at full size;
    the others, when a call is long, warm up on 256 rows (loads libraries and thread pools)
    rather than spending seconds on a full call. Returns ``(call, x, info)``; raises
    NotAvailable."""
    device = torch.device(spec["device"])
    op, impl, mode = spec["op"], spec["impl"], spec["mode"]
    dtype = C.DTYPES[spec["dtype"]]
    n, v, h = spec["N"], spec["V"], spec.get("H") or BASE_H
    grad = mode != "fwd"
    if x is None:
        x = make_inputs(op, dtype, n, v, h, grad, device)
    call = make_call(*build(op, impl, x), mode)
    info: dict = {}
    if impl.startswith("thresher"):
        info["backend"] = _thresher_backend(device, dtype, v)
    t0 = time.perf_counter()
    if impl not in COMPILED and spec["small_warmup"]:
        xs = make_inputs(op, dtype, min(n, 256), v, h, grad, device, seed=1)
        make_call(*build(op, impl, xs), mode)()
        del xs
    else:
        for _ in range(max(1, spec["warmup"]) if impl in COMPILED else spec["warmup"]):
            res = call()
            info.setdefault("loss", _loss_of(res))
            del res
    call.restore()  # the warm-up may have overwritten the inputs (overwrite_logits)
    info["warmup_s"] = time.perf_counter() - t0
    return call, x, info


def memory_case(spec: dict) -> dict:
    """Phase 1 for one case (the body of a child process)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["impl"] in COMPILED:
        torch._dynamo.reset()
    try:
        call, x, info = prepare(spec)
    except NotAvailable as exc:
        return {"status": f"n/a: {exc}"}
    res, extra, method, ms = C.measure_peak_memory(call, torch.device(spec["device"]))
    info.update(peak_bytes=extra, mem_method=method, loss=_loss_of(res), first_ms=ms)
    del res, call, x
    return info


def _spec(case, args, device) -> dict:
    spec = {k: case[k] for k in ("op", "impl", "dtype", "N", "V", "H", "mode", "repeats",
                                 "small_warmup")}
    spec.update(device=str(device), warmup=args.warmup, threads=args.threads)
    return spec


def run_group(cases: list[dict], args, device) -> None:
    """Both phases for cases sharing (op, dtype, N, V, H, mode); fills in the cases."""
    todo = [c for c in cases if c["status"] == "planned"]
    if not todo:
        return
    t_group = time.perf_counter()
    if args.memory == "subprocess":
        for c in todo:
            t0 = time.perf_counter()
            res = C.run_child(SCRIPT, {"task": "memory", "spec": _spec(c, args, device)},
                              timeout=args.case_timeout_s)
            if "error" in res:
                res = {"status": "error: " + res.pop("error")}
            c.update(res)
            c["memory_wall_s"] = time.perf_counter() - t0
    # phase 2
    single = [c for c in todo if c["status"] == "planned" and c["repeats"] == 1
              and c.get("first_ms") is not None]
    for c in single:
        c.update(status="ok", **C.Timing.from_samples([c.pop("first_ms")]).as_dict())
    timed = [c for c in todo if c["status"] == "planned"]
    if not timed:
        return
    torch._dynamo.reset()  # compiled implementations compile for this group's shapes only
    calls, x = {}, None
    for c in timed:
        try:
            call, x, info = prepare(_spec(c, args, device), x)
        except NotAvailable as exc:
            c["status"] = f"n/a: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001
            c["status"] = f"error: {type(exc).__name__}: {exc}"[:400]
            continue
        for k, v in info.items():
            c.setdefault(k, v)
        calls[c["impl"]] = call
    by_impl = {c["impl"]: c for c in timed if c["impl"] in calls}
    copy_key = "copy (clone of the logits)"
    if todo[0]["op"] == "ce" and x is not None and calls:
        # this machine's copy bandwidth, sampled in the same rounds: the fraction of copy
        # bandwidth then compares numbers taken under the same load
        logits = x["logits"].detach()
        calls[copy_key] = lambda: logits.clone()
    first = {}
    if args.memory == "inprocess":  # one call each, before the rounds; also a sample
        for k, c in by_impl.items():
            res, extra, method, ms = C.measure_peak_memory(calls[k], device)
            c.update(peak_bytes=extra, mem_method=method, loss=_loss_of(res))
            first[k] = ms
            del res
    try:
        reps = {k: c["repeats"] for k, c in by_impl.items()}
        if copy_key in calls:
            reps[copy_key] = max(reps.values())
        timings = C.time_interleaved(
            calls, repeats=reps, device=device,
            # repeats come from an estimate; one far slower than estimated stops after
            # ~2x the case budget (the headline and the base shape keep their repeats)
            max_time_s={k: None if c.get("headline") or c.get("keep_repeats")
                        else 2 * args.case_budget_s for k, c in by_impl.items()},
            min_repeats=3 if any(c.get("headline") for c in timed) else 1,
            first_samples_ms=first)
    except Exception as exc:  # noqa: BLE001
        for c in by_impl.values():
            c["status"] = f"error: {type(exc).__name__}: {exc}"[:400]
        return
    if copy_key in timings:
        copy_bytes = 2 * x["logits"].numel() * x["logits"].element_size()
        for c in todo:
            c["copy_gbps_group"] = copy_bytes / (timings[copy_key].median_ms * 1e-3) / 1e9
    for k, c in by_impl.items():
        c.pop("first_ms", None)
        c.update(status="ok", **timings[k].as_dict())
        if c.get("loss") is None and c["est_s"] < 1.0:  # for the cross-check, if cheap
            calls[k].restore()  # inputs an implementation overwrote
            c["loss"] = _loss_of(calls[k]())
    del calls, x
    gc.collect()
    for c in todo:
        c["group_wall_s"] = time.perf_counter() - t_group


def child_handler(payload: dict) -> dict:
    if payload["task"] == "memory":
        return memory_case(payload["spec"])
    if payload["task"] == "gpu_stats":
        return gpu_stats(payload["ccs"])
    raise ValueError(payload["task"])


# ----------------------------------------------------------------------------------------
# Planning: sweep, estimates, skips
# ----------------------------------------------------------------------------------------


def sweep_shapes(ns, vs, base_n, base_v):
    """One axis at a time around (base_n, base_v): N axis at base V, then V axis at base N."""
    shapes = [(n, base_v) for n in ns] + [(base_n, v) for v in vs]
    return list(dict.fromkeys(shapes))


def est_memory_bytes(op, impl, elem, n, v, h, mode) -> int:
    """Conservative total (inputs + peak) footprint, for skipping what will not fit."""
    nv = n * v
    if op == "ce":
        if impl == "thresher overwrite_logits":
            return nv * elem
        if impl == "thresher":
            return nv * elem * (1 if mode == "fwd" else 2)
        return nv * elem + nv * 4 * (1 if mode == "fwd" else 3)
    if impl in ("thresher", "thresher unweighted", "F.linear_cross_entropy chunked",
                "cut-cross-entropy"):
        return (n + v) * h * (elem + 8) + 512 * C.MiB
    return nv * (elem + 4 * (1 if mode == "fwd" else 3)) + (n + v) * h * (elem + 8)


def est_call_seconds(op, impl, dtype, n, v, h, mode, machine) -> float:
    """Rough per-call time on this machine: GEMM FLOPs at the probed GEMM rate plus ~3x
    (fwd) / ~8x (fwd+bwd) the logits' bytes at the copy bandwidth (eager-like traffic)."""
    bw = machine["copy_gbps"] * 1e9
    elem = torch.tensor([], dtype=dtype).element_size()
    if op == "ce":
        return ce_bytes(n, v, elem, mode) * (3 if mode == "fwd" else 4) / bw
    rate = machine.get("gemm_gflops", {}).get(C.dtype_name(dtype), 50.0) * 1e9
    if impl in ("F.linear_cross_entropy chunked", "cce torch_compile"):
        rate = max(rate, machine.get("gemm_gflops", {}).get("fp32", 50.0) * 1e9)  # fp32 acc
    return linear_flops(n, h, v, mode) / rate + ce_bytes(n, v, 4, mode) * 4 / bw


def probe_gemm_gflops(dtypes, device) -> dict:
    """GEMM rate at the LM head's shape (m x 512 @ 512 x 4096), for the time estimates."""
    out = {}
    for name in dtypes:
        dt = C.DTYPES[name]
        m = 256 if dt in (torch.bfloat16, torch.float16) and device.type == "cpu" else 2048
        a = torch.randn(m, 512, device=device).to(dt)
        b = torch.randn(4096, 512, device=device).to(dt)
        t = C.time_callable(lambda: a @ b.t(), warmup=1, repeats=3, device=device)
        out[name] = 2 * m * 512 * 4096 / (t.median_ms * 1e-3) / 1e9
    return out


def case_key(c: dict) -> tuple:
    return (c["op"], c["impl"], c["dtype"], c["N"], c["V"], c["H"], c["mode"])


def group_key(c: dict) -> tuple:
    return (c["op"], c["dtype"], c["N"], c["V"], c["H"], c["mode"])


def plan_cases(args, machine, device) -> list[dict]:
    """Every (op, impl, dtype, N, V, mode) of the sweep with its status and repeats. One
    axis at a time: N and V vary around the base shape in the first --dtype; the other
    dtypes run the base shape (every shape with --full-grid). Both modes everywhere."""
    cases = []
    ops = ["ce", "linear"] if args.only is None else [args.only]
    for op in ops:
        impls = args.ce_impls if op == "ce" else args.linear_impls
        shapes = sweep_shapes(args.n, args.v, args.base_n, args.base_v)
        modes = args.modes_ce if op == "ce" else args.modes_linear
        if args.modes:
            modes = [m for m in modes if m in args.modes]
        for i, dtype_name in enumerate(args.dtype):
            elem = C.DTYPES[dtype_name].itemsize
            for n, v in (shapes if i == 0 or args.full_grid else [(args.base_n, args.base_v)]):
                base = (n, v) == (args.base_n, args.base_v)
                for mode in modes:
                    group = [plan_one(args, machine, device, op, impl, dtype_name, elem, n, v,
                                      args.h if op == "linear" else None, mode)
                             for impl in impls if base or impl not in BASE_ONLY]
                    # a group runs whole or not at all: without its slowest member (eager,
                    # the baseline) the others have nothing to be compared with. The base
                    # shape in the first dtype always runs.
                    est = max([c["est_s"] for c in group if c["status"] == "planned"],
                              default=0.0)
                    if base and i == 0:  # what readers look at first: >= 3 samples
                        for c in group:
                            c.update(repeats=max(3, c["repeats"]), keep_repeats=True)
                    if est > args.max_call_s and not (base and i == 0):
                        for c in group:
                            if c["status"] == "planned":
                                c["status"] = (f"skipped: ~{est:.0f} s per call here > "
                                               f"--max-call-s {args.max_call_s:g}")
                    for c in group:
                        c["sweep"] = True
                    cases.extend(group)
    return cases


def plan_one(args, machine, device, op, impl, dtype_name, elem, n, v, h, mode, *,
             headline=None, repeats=None) -> dict:
    dtype = C.DTYPES[dtype_name]
    est = est_call_seconds(op, impl, dtype, n, v, h or BASE_H, mode, machine)
    mem = est_memory_bytes(op, impl, elem, n, v, h or BASE_H, mode)
    case = {"op": op, "impl": impl, "dtype": dtype_name, "N": n, "V": v, "H": h, "mode": mode,
            "est_s": est, "est_mem_bytes": mem, "headline": headline}
    why = unavailable(op, impl, device)
    if why:
        case["status"] = f"n/a: {why}"
    elif mem > args.mem_limit_gb * 1e9:
        case["status"] = (f"skipped: needs ~{mem / 1e9:.1f} GB > --mem-limit-gb "
                          f"{args.mem_limit_gb:g}")
    else:
        case["status"] = "planned"
    # slow cases get fewer samples: about --case-budget-s of timing each (at least one;
    # at least three for the headline)
    fit = max(1, int(args.case_budget_s / max(est, 1e-6)))
    case["repeats"] = max(3 if headline else 1, min(repeats or args.repeats, fit))
    case["small_warmup"] = est > 1.0
    return case


# ----------------------------------------------------------------------------------------
# Running the plan
# ----------------------------------------------------------------------------------------


def set_malloc_trim():
    """The allocator settings the child processes get (C.CHILD_ENV): freed blocks above
    64 KiB go back to the OS at once, so the resident set measures live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def derive(rows: list[dict], machine: dict) -> None:
    """Speedup vs eager, bandwidth, GFLOP/s, loss cross-check."""
    key = group_key

    ref = {key(r): r for r in rows if r["impl"] == "eager" and r["status"] == "ok"}
    ref_unw = {key(r): r for r in rows
               if r["impl"] == "F.linear_cross_entropy" and r["status"] == "ok"}
    for r in rows:
        r["op_name"] = OP_NAMES[r["op"]]
        r["weighted"] = r["impl"] not in UNWEIGHTED
        if r["status"] != "ok":
            continue
        e = ref.get(key(r))
        if e is not None:
            r["speedup_vs_eager"] = e["median_ms"] / r["median_ms"]
        if r.get("peak_bytes") is not None:
            r["peak_mib"] = r["peak_bytes"] / C.MiB
        elem = torch.tensor([], dtype=C.DTYPES[r["dtype"]]).element_size()
        sec = r["median_ms"] * 1e-3
        if r["op"] == "ce":
            r["bytes_model"] = ce_bytes(r["N"], r["V"], elem, r["mode"])
            r["gbps"] = r["bytes_model"] / sec / 1e9
            r["frac_copy_bw"] = r["gbps"] / (r.get("copy_gbps_group") or machine["copy_gbps"])
            if machine.get("hbm_bytes_per_s"):
                r["frac_peak_bw"] = r["gbps"] * 1e9 / machine["hbm_bytes_per_s"]
        else:
            r["gflops"] = linear_flops(r["N"], r["H"], r["V"], r["mode"]) / sec / 1e9
            if machine.get("bf16_flop_per_s"):  # of the dense bf16 peak, whatever the dtype
                r["frac_peak_flops"] = r["gflops"] * 1e9 / machine["bf16_flop_per_s"]
        check = (ref_unw if not r["weighted"] else ref).get(key(r))
        if check is not None and r.get("loss") is not None:
            rel = abs(r["loss"] - check["loss"]) / max(abs(check["loss"]), 1e-12)
            r["loss_rel_err"] = rel
            tol = 1e-3 if r["dtype"] == "fp32" else 3e-2
            if rel > tol:
                r["status"] = f"ok (loss differs from {check['impl']} by {rel:.1e})"


COLUMNS = [
    ("impl", "impl"), ("op_name", "op"),
    ("weighted", "weighted", lambda b: "" if b is None else "yes" if b else "no"),
    ("dtype", "dtype"), ("N", "N"), ("V", "V"), ("H", "H"), ("mode", "mode"),
    ("median_ms", "median ms", ".1f"), ("p20_ms", "p20", ".1f"), ("p80_ms", "p80", ".1f"),
    ("n", "n"), ("speedup_vs_eager", "vs eager", lambda x: f"{x:.2f}x"),
    ("peak_mib", "peak extra MiB", ".0f"), ("gbps", "GB/s", ".2f"),
    ("frac_copy_bw", "% copy BW", lambda x: f"{100 * x:.0f}%"),
    ("gflops", "GFLOP/s", ".0f"),
    ("frac_peak_bw", "% peak HBM", lambda x: f"{100 * x:.0f}%"),
    ("frac_peak_flops", "% peak bf16", lambda x: f"{100 * x:.0f}%"),
    ("status_short", "status"),
]


def _collapse_skipped(rows):
    """A group skipped whole prints as one line (the CSV/JSON keep every row)."""
    out, seen = [], set()
    for r in rows:
        k = group_key(r)
        group = [x for x in rows if group_key(x) == k]
        if r["status"].startswith("skipped") and all(x["status"] == r["status"] for x in group):
            if k not in seen:
                seen.add(k)
                out.append({**r, "impl": f"(all {len(group)})", "weighted": None})
            continue
        out.append(r)
    return out


def print_table(rows, title):
    """The table; long statuses (n/a reasons, skips, errors) become footnotes under it."""
    notes: list[str] = []
    rows = _collapse_skipped(rows)
    for r in rows:
        s = r["status"]
        if s == "ok":
            r["status_short"] = ""
        elif len(s) <= 40:
            r["status_short"] = s
        else:
            if s not in notes:
                notes.append(s)
            r["status_short"] = f"{s.split(':')[0]} [{notes.index(s) + 1}]"
    print(f"\n### {title}\n")
    print(C.markdown_table(rows, COLUMNS))
    if notes:
        print()
        for i, s in enumerate(notes, 1):
            print(f"[{i}] {s}")


# ----------------------------------------------------------------------------------------
# GPU section (AOT compile stats of the Triton kernels + H100 rooflines)
# ----------------------------------------------------------------------------------------


def gpu_stats(ccs) -> dict:
    """Runs in a child process (without TRITON_INTERPRET): compile stats per cc."""
    try:
        from thresher.kernels import cross_entropy as k
    except Exception as exc:  # noqa: BLE001
        return {"error": f"thresher.kernels.cross_entropy not importable: "
                         f"{type(exc).__name__}: {exc}"}
    if not hasattr(k, "aot_compile_stats"):
        return {"error": "thresher.kernels.cross_entropy has no aot_compile_stats(cc)"}
    out = {"stats": [], "errors": {}}
    for cc in ccs:
        try:
            out["stats"].extend(k.aot_compile_stats(cc))
        except Exception as exc:  # noqa: BLE001
            out["errors"][str(cc)] = f"{type(exc).__name__}: {exc}"[:300]
    if hasattr(k, "launch_config"):
        out["launch"] = {str(v): list(k.launch_config(v)) for v in (32000, 128256)}
    return out


# Bytes per (N*V*elem) a kernel moves, by kernel name: a loss-only forward reads the logits
# once; the fused forward reads them, re-reads them (pass 2) and writes the gradient; the
# backward from the saved lse reads once and writes once.
def kernel_passes(name: str) -> int:
    if "grad" in name:
        return 3
    if "bwd" in name or "backward" in name:
        return 2
    return 1


ELEM = {"fp32": 4, "float32": 4, "bf16": 2, "fp16": 2, "bfloat16": 2, "float16": 2}


def gpu_section(args) -> dict:
    print("\n## GPU (from what compiles here; no GPU needed)\n")
    N, Vs = 4096, (32000, 128256)
    # the AOT compile needs the real (not interpreted) JIT functions
    res = C.run_child(SCRIPT, {"task": "gpu_stats", "ccs": [80, 90]},
                      timeout=args.case_timeout_s, env={"TRITON_INTERPRET": None})
    section: dict = {"N": N, "V": list(Vs), "hbm_bytes_per_s": C.H100_HBM_BYTES_PER_S,
                     "bf16_flop_per_s": C.H100_BF16_DENSE_FLOP_PER_S}
    if "error" in res:
        print(f"Triton kernel stats: n/a: {res['error']}\n")
        section["kernels_error"] = res["error"]
        stats = []
    else:
        stats = res["stats"]
        for cc, err in res.get("errors", {}).items():
            print(f"sm_{cc}: AOT compile failed: {err}")
        section["errors"] = res.get("errors", {})
    launch = res.get("launch", {})
    for s in stats:
        s["used_for"] = ", ".join(f"V={v}" for v in Vs
                                  if launch.get(str(v), [None])[0] == s.get("block_v"))
    # One line per (kernel, dtype): registers / spills over every compiled variant (launch
    # configuration and specialisation), per target; the full list goes to the JSON.
    summary = {}
    for s in stats:
        k = (s["kernel"], str(s["dtype"]))
        g = summary.setdefault(k, {"kernel": k[0], "dtype": k[1], "variants": 0})
        cc = s.get("cc")
        g["variants"] += 1 if cc == 80 or len({x.get("cc") for x in stats}) == 1 else 0
        regs, spills = s.get("n_regs"), s.get("n_spills")
        lo, hi = g.get(f"regs_lo{cc}"), g.get(f"regs_hi{cc}")
        if regs is not None:
            g[f"regs_lo{cc}"] = regs if lo is None else min(lo, regs)
            g[f"regs_hi{cc}"] = regs if hi is None else max(hi, regs)
        if spills is not None:
            g[f"spills{cc}"] = max(g.get(f"spills{cc}", 0), spills)
        g["shared"] = max(g.get("shared", 0), s.get("shared") or 0)
    for g in summary.values():
        passes = kernel_passes(g["kernel"])
        elem = ELEM.get(g["dtype"], 4)
        g["passes"] = passes
        for cc in (80, 90):
            lo, hi = g.get(f"regs_lo{cc}"), g.get(f"regs_hi{cc}")
            g[f"regs{cc}"] = None if lo is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")
        for v in Vs:
            g[f"h100_us_V{v}"] = C.roofline_seconds(bytes_moved=passes * N * v * elem) * 1e6
    if stats:
        print(f"Triton kernels (kernels/cross_entropy.py), AOT-compiled for sm_80 and sm_90 "
              f"with every launch configuration the launchers use ({len(stats)} compiles; "
              "registers as min-max over the variants, spills the worst). H100 roofline at "
              f"N={N}: bytes / {C.H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s, bytes = passes x N x V"
              " x elem (ce_fwd 1: read; ce_fwd_grad 3: read, re-read, write the gradient; "
              "ce_bwd 2: read, write the gradient).\n")
        cols = [("kernel", "kernel"), ("dtype", "dtype"), ("variants", "variants"),
                ("regs80", "regs sm_80"), ("spills80", "spills sm_80"),
                ("regs90", "regs sm_90"), ("spills90", "spills sm_90"),
                ("shared", "smem B"), ("passes", "passes")]
        cols += [(f"h100_us_V{v}", f"H100 us V={v}", ".1f") for v in Vs]
        print(C.markdown_table(list(summary.values()), cols))
        spilled = [s for s in stats if s.get("n_spills")]
        print(f"\nregister spills: {'none' if not spilled else len(spilled)} "
              f"(of {len(stats)} compiled kernels)")
    section["kernel_summary"] = list(summary.values())
    section["kernels"] = stats
    # Linear variant: LM-head GEMMs at H = 512 (and the CE traffic on bf16 logits).
    lin = []
    for v in Vs:
        for mode in ("fwd", "fwd+bwd"):
            fl = linear_flops(N, args.h, v, mode)
            by = ce_bytes(N, v, 2, mode) if mode == "fwd" else 3 * N * v * 2
            lin.append({"N": N, "H": args.h, "V": v, "mode": mode, "gflop": fl / 1e9,
                        "gemm_us": C.roofline_seconds(flops=fl) * 1e6,
                        "ce_bytes_mb": by / 1e6,
                        "ce_us": C.roofline_seconds(bytes_moved=by) * 1e6})
    print(f"\nlinear_weighted_ce on H100, bf16: GEMM FLOPs 2*N*H*V (fwd), 3x that with bwd, at "
          f"{C.H100_BF16_DENSE_FLOP_PER_S / 1e12:.0f} TFLOP/s; CE bytes as the kernels above "
          "(fwd 1 pass, fused fwd+bwd 3 passes over the bf16 logits).\n")
    print(C.markdown_table(lin, [("N", "N"), ("H", "H"), ("V", "V"), ("mode", "mode"),
                                 ("gflop", "GFLOP", ".1f"), ("gemm_us", "GEMM us", ".1f"),
                                 ("ce_bytes_mb", "CE MB", ".0f"), ("ce_us", "CE us", ".1f")]))
    section["linear"] = lin
    return section


# ----------------------------------------------------------------------------------------
# Headline: the two targets, measured as ratios in one run
# ----------------------------------------------------------------------------------------

HEADLINE_A = dict(op="ce", dtype="fp32", N=4096, V=32000, H=None, mode="fwd+bwd",
                  impls=("thresher", "thresher overwrite_logits", "eager", "torch.compile"))
HEADLINE_B = dict(op="linear", dtype="fp32", N=8192, V=32000, H=512, mode="fwd+bwd",
                  impls=("thresher unweighted", "thresher", "F.linear_cross_entropy",
                         "F.linear_cross_entropy chunked"))


def estimate_total_s(cases, args) -> float:
    """Rough wall time of the planned cases (phase 1 child: start-up, warm-up, one call;
    phase 2: warm-up and the repeats), from the per-call estimates."""
    def cost(c):
        warm = 0.1 if c["small_warmup"] and c["impl"] not in COMPILED else c["est_s"]
        comp = 8 if c["impl"] in COMPILED else 0
        p1 = 2.5 + warm + comp + c["est_s"] if args.memory == "subprocess" else 0
        p2 = 0 if p1 and c["repeats"] == 1 else warm + comp + c["est_s"] * c["repeats"]
        return p1 + p2
    return sum(cost(c) for c in cases if c["status"] == "planned")


def headline_cases(args, machine, device) -> list[dict]:
    cases = []
    for tag, hl in (("a", HEADLINE_A), ("b", HEADLINE_B)):
        if args.only is not None and hl["op"] != args.only:
            continue
        elem = C.DTYPES[hl["dtype"]].itemsize
        for impl in hl["impls"]:
            cases.append(plan_one(args, machine, device, hl["op"], impl, hl["dtype"], elem,
                                  hl["N"], hl["V"], hl["H"], hl["mode"], headline=tag,
                                  repeats=args.headline_repeats))
    return cases


def _get(rows, tag, impl):
    for r in rows:
        if r.get("headline") == tag and r["impl"] == impl and r["status"].startswith("ok"):
            return r
    return None


def _ratio_str(num, den):
    return f"{num:.2f}x" if num is not None and den else "n/a"


def headline_report(rows) -> list[dict]:
    verdicts = []
    print("\n## Headline (targets from the issue; ratios measured in this run)\n")
    if any(r.get("headline") == "a" for r in rows):
        hl = HEADLINE_A
        t, o, e, c = (_get(rows, "a", i) for i in hl["impls"])
        print(f"(a) weighted_cross_entropy {hl['dtype']} N={hl['N']} V={hl['V']} with "
              f"sample_weight, {hl['mode']} (median [p20, p80] ms):")
        for name, r in zip(hl["impls"], (t, o, e, c)):
            print(f"    {name:<26} " + (f"{r['median_ms']:9.1f} [{r['p20_ms']:.1f}, "
                                        f"{r['p80_ms']:.1f}]  n={r['n']}" if r else "n/a"))
        for mine, label in ((t, "thresher"), (o, "thresher overwrite_logits")):
            for base, name, target in ((e, "eager", 3.0), (c, "torch.compile", 2.0)):
                sp = base["median_ms"] / mine["median_ms"] if mine and base else None
                # conservative bracket: the baseline's fast tail vs thresher's slow tail
                lo = base["p20_ms"] / mine["p80_ms"] if mine and base else None
                ok = sp is not None and sp >= target
                verdicts.append({"target": f"(a) {label} speedup vs {name} >= {target:g}x",
                                 "value": sp, "pass": ok})
                print(f"    {label} vs {name:<14} {_ratio_str(sp, 1)} (p20/p80 bracket >= "
                      f"{_ratio_str(lo, 1)})  target >= {target:g}x  "
                      f"{'PASS' if ok else 'FAIL' if sp is not None else 'n/a'}")
    if any(r.get("headline") == "b" for r in rows):
        hl = HEADLINE_B
        tu, tw, fl, fc = (_get(rows, "b", i) for i in hl["impls"])
        print(f"\n(b) linear_weighted_cross_entropy {hl['dtype']} N={hl['N']} H={hl['H']} "
              f"V={hl['V']}, {hl['mode']} (median [p20, p80] ms; peak extra MiB):")
        for name, r in zip(hl["impls"], (tu, tw, fl, fc)):
            mem = f"{r['peak_bytes'] / C.MiB:8.0f} MiB" if r and r.get("peak_bytes") is not None \
                else "   (no memory run)"
            print(f"    {name:<31} " + (f"{r['median_ms']:9.1f} [{r['p20_ms']:.1f}, "
                                        f"{r['p80_ms']:.1f}] n={r['n']}  {mem}" if r else "n/a"))
        # Compared unweighted (F.linear_cross_entropy takes no per-sample weight). The
        # target is against F.linear_cross_entropy as called by default (options=None);
        # the chunked options path is reported beside it.
        for peer, label, primary in ((fl, "F.linear_cross_entropy (default)", True),
                                     (fc, "F.linear_cross_entropy chunked", False)):
            mem_pct = (100 * tu["peak_bytes"] / peer["peak_bytes"]
                       if tu and peer and tu.get("peak_bytes") is not None
                       and peer.get("peak_bytes") else None)
            tr = tu["median_ms"] / peer["median_ms"] if tu and peer else None
            tag = "" if primary else " [info]"
            ok_m = mem_pct is not None and mem_pct <= 25.0
            ok_t = tr is not None and tr <= 1.1
            if primary:
                verdicts.append({"target": "(b) peak memory <= 25% of F.linear_cross_entropy",
                                 "value": mem_pct, "pass": ok_m})
                verdicts.append({"target": "(b) time <= 1.1x F.linear_cross_entropy",
                                 "value": tr, "pass": ok_t})
            ms = f"{mem_pct:.1f}%" if mem_pct is not None else "n/a (no memory run)"
            print(f"    vs {label}: peak memory {ms} (target <= 25%) "
                  f"{'PASS' if ok_m else 'FAIL' if mem_pct is not None else 'n/a'}{tag}; "
                  f"time {_ratio_str(tr, 1)} (target <= 1.1x) "
                  f"{'PASS' if ok_t else 'FAIL' if tr is not None else 'n/a'}{tag}")
    return verdicts


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, default_repeats=7)
    p.add_argument("--quick", action="store_true",
                   help="tiny sweep (fp32, N=1024, V=32000, 3 repeats, in-process memory, linear "
                        "fwd+bwd without the compiled peers), "
                        "under a minute; no headline")
    p.add_argument("--headline", action="store_true", help="run only the two headline targets")
    p.add_argument("--only", choices=("ce", "linear"), default=None)
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: fp32 bf16")
    p.add_argument("--n", type=int, nargs="+", default=list(N_AXIS), help="N axis")
    p.add_argument("--v", type=int, nargs="+", default=list(V_AXIS), help="V axis")
    p.add_argument("--h", type=int, default=BASE_H, help="hidden size of the linear op")
    p.add_argument("--full-grid", action="store_true",
                   help="every dtype at every shape (default: dtypes other than the first "
                        "run the base shape only)")
    p.add_argument("--base-n", type=int, default=BASE_N)
    p.add_argument("--base-v", type=int, default=BASE_V)
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default=None,
                   help="peak memory: fresh process per case (default), in this process, or "
                        "not at all (--no-memory)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip sweep groups estimated to take longer per call (default 5; the "
                        "base shape in the first dtype and "
                        "the headline always runs)")
    p.add_argument("--mem-limit-gb", type=float, default=12.0,
                   help="skip cases estimated to need more memory (default %(default)s)")
    p.add_argument("--case-budget-s", type=float, default=5.0,
                   help="timing time per case: repeats = min(--repeats, budget / est. call "
                        "time), at least 1 (3 for the headline)")
    p.add_argument("--headline-repeats", type=int, default=None,
                   help="repeats for the headline cases (default: --repeats)")
    p.add_argument("--case-timeout-s", type=float, default=900.0)
    p.add_argument("--no-gpu-section", action="store_true")
    p.add_argument("--no-headline", action="store_true",
                   help="the sweep only, without the two headline cases")
    p.add_argument("--plan", action="store_true", help="print the plan and estimates; run nothing")
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=None,
                   help="only these modes (default: both; --quick: linear fwd+bwd)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="only these implementations (names as in the table; default: all)")
    args = p.parse_args(argv)
    if args.no_memory:
        args.memory = "off"
    if args.quick:
        args.dtype = args.dtype or ["fp32"]
        args.n, args.v = [1024], [32000]
        args.base_n, args.base_v = 1024, 32000
        args.repeats = min(args.repeats, 3)
        args.case_budget_s = min(args.case_budget_s, 2.0)
        args.memory = args.memory or "inprocess"
        args.modes_linear = ["fwd+bwd"]
        # compiling the linear graphs alone would take most of the minute
        args.linear_impls = tuple(i for i in LINEAR_IMPLS if i not in COMPILED)
    else:
        args.linear_impls = LINEAR_IMPLS
        args.modes_linear = ["fwd", "fwd+bwd"]
    args.modes_ce = ["fwd", "fwd+bwd"]
    args.ce_impls = CE_IMPLS
    if args.impls:
        unknown = set(args.impls) - set(CE_IMPLS) - set(LINEAR_IMPLS)
        if unknown:
            p.error(f"--impls: unknown {sorted(unknown)}; choose from "
                    f"{sorted(set(CE_IMPLS) | set(LINEAR_IMPLS))}")
        args.ce_impls = tuple(i for i in CE_IMPLS if i in args.impls)
        args.linear_impls = tuple(i for i in args.linear_impls if i in args.impls)
    args.dtype = args.dtype or ["fp32", "bf16"]
    args.memory = args.memory or "subprocess"
    args.max_call_s = args.max_call_s if args.max_call_s is not None else 5.0
    args.headline_repeats = args.headline_repeats or args.repeats
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if C.child_main(argv, child_handler):
        return 0
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    set_malloc_trim()  # return freed blocks to the OS: this process times many shapes
    t_start = time.perf_counter()
    machine = C.measure_copy_bandwidth(device=device)
    machine.update(C.device_peaks(torch.cuda.get_device_name(device)
                                  if device.type == "cuda" else None))
    run_linear = args.only in (None, "linear")
    if run_linear:
        machine["gemm_gflops"] = probe_gemm_gflops(sorted(set(args.dtype) | {"fp32"}), device)
    meta = C.collect_metadata(device=device if device.type == "cuda" else None,
                              device_used=str(device), memory_mode=args.memory, **machine)
    print(f"# thresher cross-entropy benchmark\n\n{meta['cpu_model']}, "
          f"{meta['cpus_usable']} usable cores ({meta['torch_threads']} torch threads), "
          f"torch {meta['torch']}, thresher {meta['thresher']}, commit "
          f"{(meta['git_commit'] or 'unknown')[:12]}{' (dirty)' if meta['git_dirty'] else ''}; "
          f"copy bandwidth {machine['copy_gbps']:.2f} GB/s (read+write of a "
          f"{machine['copy_bytes'] // C.MiB} MiB clone)"
          + (", GEMM " + ", ".join(f"{k} {v:.0f} GFLOP/s"
                                   for k, v in machine["gemm_gflops"].items())
             if run_linear else "") + f"; memory: {args.memory}")

    cases = [] if args.headline else plan_cases(args, machine, device)
    if not args.quick and not args.no_headline:
        # a headline case the sweep already runs is measured once, with the headline's
        # repeats
        index = {case_key(c): c for c in cases if c["status"] == "planned"}
        for h in headline_cases(args, machine, device):
            c = index.get(case_key(h))
            if c is None:
                cases.append(h)
            else:
                c.update(headline=h["headline"], repeats=max(c["repeats"], h["repeats"]))
    if args.plan:
        todo = [c for c in cases if c["status"] == "planned"]
        total = estimate_total_s(cases, args)
        print(C.markdown_table(cases, [("op", "op"), ("impl", "impl"), ("dtype", "dtype"),
                                       ("N", "N"), ("V", "V"), ("mode", "mode"),
                                       ("est_s", "est s/call", ".2f"), ("repeats", "n"),
                                       ("headline", "headline"), ("status", "status")]))
        print(f"\n{len(todo)} cases to run, roughly {total / 60:.0f} min")
        return 0

    print(f"{sum(c['status'] == 'planned' for c in cases)} cases planned, roughly "
          f"{estimate_total_s(cases, args) / 60:.0f} min", file=sys.stderr, flush=True)
    groups: dict = {}
    for c in cases:
        groups.setdefault(group_key(c), []).append(c)
    for i, (key, group) in enumerate(groups.items(), 1):
        todo = [c["impl"] for c in group if c["status"] == "planned"]
        if todo:
            g = group[0]
            print(f"[{i}/{len(groups)}] {g['op']} {g['dtype']} N={g['N']} V={g['V']} "
                  f"{g['mode']}: {', '.join(todo)} (~{max(c['est_s'] for c in group):.1f} "
                  f"s/call)", file=sys.stderr, flush=True)
        run_group(group, args, device)
    rows = cases
    # n/a implementations: one row per op (their reason does not depend on the shape)
    shown_na = set()
    kept = []
    for r in rows:
        if r["status"].startswith("n/a") and r.get("sweep"):
            if (r["op"], r["impl"]) in shown_na:
                continue
            shown_na.add((r["op"], r["impl"]))
        kept.append(r)
    rows = kept
    derive(rows, machine)

    sweep = [r for r in rows if r.get("sweep")]
    for op in ("ce", "linear"):
        part = [r for r in sweep if r["op"] == op]
        if part:
            print_table(part, f"{OP_NAMES[op]} sweep (one axis at a time around N={args.base_n}"
                              f", V={args.base_v}" + (f", H={args.h}" if op == "linear" else "")
                        + ")")
    notes = [
        "fwd = loss under torch.no_grad(); fwd+bwd = loss + torch.autograd.grad(loss, "
        "inputs) (logits, or hidden and W).",
        "peak extra MiB: resident-set high-water mark during one call above what was "
        f"resident with the inputs allocated ({args.memory}); includes the returned "
        "gradients.",
        "GB/s (weighted_ce only): byte model N*V*elem (fwd) or 2*N*V*elem (fwd+bwd: read "
        "logits + write grad) over the median time; % copy BW: of a clone of the same "
        "logits (read + write bytes) timed in the same rounds (falls back to the "
        f"{machine['copy_gbps']:.2f} GB/s measured at start). A read-only forward can pass "
        "100%: reading is cheaper than copying.",
        "weighted=no rows take no per-sample weight (compare them with each other and with "
        "F.linear_cross_entropy).",
    ]
    print("\n" + "\n".join(f"- {n}" for n in notes))
    verdicts = []
    if any(r.get("headline") for r in rows):
        hl_rows = [r for r in rows if r.get("headline")]
        print_table(hl_rows, "headline cases")
        verdicts = headline_report(rows)
    elif args.quick:
        print("\n(headline targets not run with --quick; use --headline)")
    gpu = None if args.no_gpu_section else gpu_section(args)
    for r in rows:
        r.pop("status_short", None)
    meta["wall_s"] = time.perf_counter() - t_start
    name = NAME + ("-quick" if args.quick else "-headline" if args.headline else "")
    paths = C.write_results(args.out, name, rows, meta, headline=verdicts, gpu=gpu,
                            notes=notes)
    print(f"\nwrote {paths['csv']} and {paths['json']} ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
