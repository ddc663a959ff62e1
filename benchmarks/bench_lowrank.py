#!/usr/bin/env python
"""Benchmark of LowRankAdam (thresher.optim, on thresher.ops.lowrank) against galore-torch's
GaLoreAdamW, torchao's fused GaLore AdamW (``torchao.prototype.galore``, where importable) and
torch.optim.AdamW (foreach and fused), on the CPU or a CUDA device.

Per matrix shape (1024x1024, 2048x5632, 4096x4096) and rank (64, 128, 256), timed
interleaved round-robin on the same gradient, medians with p20/p80:

* ``step``: one optimizer step with the basis already in place (no refresh), for thresher
  (its defaults), GaLoreAdamW, torchao's GaLore AdamW and AdamW (foreach, fused);
* ``refresh``: recomputing the basis: thresher's default (``proj="power"``: one power
  iteration warm-started from the previous basis; the very first refresh of a run is the
  randomised SVD), the randomised SVD (``proj="random"``: sketch of r + max(8, r/8) columns,
  2 power iterations, Rayleigh-Ritz), the exact option (``proj="svd"``) and galore-torch's
  full ``torch.linalg.svd`` (what GaLoreAdamW runs every ``update_proj_gap`` steps);
* ``amortised`` = step + refresh / gap (gap 200): thresher's default (steady state: warm
  power refreshes), its randomised and exact options, and GaLoreAdamW;
* the two-GEMM floor: ``mm(Q^T, G)`` + ``mm(Q, N)`` into preallocated buffers (what any
  projected Adam must do), and thresher's step as a multiple of it;
* peak extra memory of a step and of each refresh (CUDA: ``max_memory_allocated``; CPU: the
  resident set's high-water mark), optimizer-state bytes;
* achieved bandwidth and FLOP/s as a fraction of the device's peak, from a byte/FLOP model
  of the minimal work (below): HBM and dense bf16 datasheet peaks by
  ``torch.cuda.get_device_name()`` (H100 SXM 3.35 TB/s, H200 4.8 TB/s, ~990 TFLOP/s bf16;
  the FLOP fraction is given for bf16/fp16 runs only), or on the CPU the measured copy
  bandwidth (no FLOP peak);
* captured gradient energy ``||P^T G||^2 / ||G||^2`` for the exact SVD basis and thresher's
  refreshes (the warm start comes from the previous gradient's SVD basis).

Work model (p x q matrix, rank r, b bytes an element, "big" = max(p, q), "small" = min):
a projected Adam step must read G and read + write W (3 p q b), read Q twice and move the
r x big projected gradient, direction and two moments (~8 r big b); it does 4 p q r FLOPs
(two GEMMs). AdamW moves 7 p q b. A warm power refresh reads G twice and does 4 p q r FLOPs
(+ a thin QR); the randomised one ~12 p q k (k = r + oversample). The exact SVD has no
such model (time only). The same model is used for every implementation, so a fraction is
"useful work done per second", comparable between them.

The gradient: a synthetic power-law spectrum, ``G = U diag(i^-alpha) V^T + noise`` with
``U, V`` Gaussian (p x k, q x k, k = min(p, q); near-orthogonal columns at these sizes),
``alpha = 0.5`` by default (``--alpha``; singular-value energy ~ 1/i, a flat, hard case for
a sketch) and white noise of 1% of the signal's RMS. The "previous" gradient for the warm
start is an independent noise draw on the same spectrum plus a 10% perturbation of the
singular vectors. Drawn on the CPU from fixed seeds, so every device sees the same one.

Peers that cannot be imported (or fail) are reported in the results (``meta.peers``) and
left out, never fatal. On the CPU, LAPACK's SVD is timed for galore-torch both with torch's
thread count and with one thread and galore is credited with the faster (thresher's exact
path always runs it single-threaded: on shared cores 2 threads were 9-13x slower).

Examples::

    python benchmarks/bench_lowrank.py --quick        # CPU: 1024x1024, rank 128 (< 1 min)
    python benchmarks/bench_lowrank.py --device cuda --quick --out DIR
                                                      # CUDA: 2048x5632, rank 256, bf16
    python benchmarks/bench_lowrank.py --headline     # 2048x5632, rank 256: default vs galore
    python benchmarks/bench_lowrank.py                # the whole grid (slow on 2 cores)

Results: Markdown on stdout and in ``--out`` (default bench-results/) as
``lowrank[_quick][_cuda].md``, with ``.csv`` and ``.json``. Timings on a shared machine are
noisy: read the ratios, measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from thresher.ops.lowrank import choose_side, project, refresh_projection  # noqa: E402
from thresher.optim import LowRankAdam  # noqa: E402

NAME = "lowrank"
SHAPES = ((1024, 1024), (2048, 5632), (4096, 4096))
RANKS = (64, 128, 256)
GAP = 200
HEADLINE = ((2048, 5632), 256)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap, default_repeats=7)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto: cuda when available (default %(default)s)")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                    help="parameter/gradient dtype (default: fp32 on the CPU, bf16 on CUDA)")
    ap.add_argument("--quick", action="store_true",
                    help="few repeats, no Triton AOT section; without --shapes/--ranks "
                         "CPU: 1024x1024 at rank 128, CUDA: the headline case")
    ap.add_argument("--headline", action="store_true", help="2048x5632 at rank 256 only")
    ap.add_argument("--shapes", default=None, help="e.g. 1024x1024,2048x5632")
    ap.add_argument("--ranks", default=None, help="e.g. 64,128,256")
    ap.add_argument("--gap", type=int, default=GAP, help="update_proj_gap (default %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.5, help="spectrum exponent (default 0.5)")
    ap.add_argument("--svd-repeats", type=int, default=3,
                    help="samples of each full SVD per shape (slow on the CPU)")
    return ap.parse_args(argv)


def device_peaks(device: torch.device) -> dict:
    """HBM bytes/s and bf16 FLOP/s peaks of a CUDA device by name (None when unknown). None
    on the CPU: its working sets here partly fit in cache (a step at 1024x1024 'moved' 9x a
    128 MiB clone's bandwidth), so only the achieved rates are reported there."""
    if device.type != "cuda":
        return {"name": C._cpu_model(), "bytes_per_s": None, "flop_per_s": None,
                "source": "none on the CPU (achieved rates only)"}
    name = torch.cuda.get_device_name(device)
    pk = C.device_peaks(name)  # the one table of datasheet peaks (benchmarks/_common.py)
    return {"name": name, "bytes_per_s": pk["hbm_bytes_per_s"],
            "flop_per_s": pk["bf16_flop_per_s"], "source": pk["source"]}


def synthetic_gradient(p, q, alpha, seed, noise=0.01, base=None, device="cpu"):
    """Power-law spectrum plus white noise (module docstring). ``base``: (U, V) to perturb.
    Drawn on the CPU, assembled in float32 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    k = min(p, q)
    if base is None:
        U = (torch.randn(p, k, generator=g) / math.sqrt(p)).to(device)
        V = (torch.randn(q, k, generator=g) / math.sqrt(q)).to(device)
    else:
        U = base[0] + 0.1 * (torch.randn(p, k, generator=g) / math.sqrt(p)).to(device)
        V = base[1] + 0.1 * (torch.randn(q, k, generator=g) / math.sqrt(q)).to(device)
    s = torch.arange(1, k + 1, dtype=torch.float32, device=device) ** -alpha
    G = (U * s) @ V.T
    G += noise * float(G.pow(2).mean().sqrt()) * torch.randn(p, q, generator=g).to(device)
    return G, (U, V)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and isinstance(v.ortho_matrix, torch.Tensor):
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()  # GaLore's basis
    return total


def energy(Q, G, side):
    return float(project(G.double(), Q.double(), side).pow(2).sum() / G.double().pow(2).sum())


def _galore_adamw():
    """galore-torch's GaLoreAdamW. Its package __init__ also imports the 8-bit variant, which
    needs bitsandbytes (125 MB, absent on some GPU images) although GaLoreAdamW does not use
    it: without bitsandbytes, galore_torch.adamw is loaded without running that __init__."""
    import importlib.util
    import types

    try:
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW, "ok (galore-torch GaLoreAdamW)"
    except ImportError as exc:
        if "bitsandbytes" not in str(exc):
            raise
        sys.modules.pop("galore_torch", None)
    spec = importlib.util.find_spec("galore_torch")
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = pkg
    from galore_torch.adamw import AdamW
    return AdamW, "ok (galore-torch GaLoreAdamW, loaded without bitsandbytes)"


def load_peers() -> tuple[dict, dict]:
    """``({name: optimizer class}, {name: "ok" | why not})`` for the optional peers."""
    classes, status = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            classes["galore"], status["galore"] = _galore_adamw()
        except Exception as exc:  # noqa: BLE001 - any import failure: report, go on
            status["galore"] = f"unavailable: {type(exc).__name__}: {exc}"
        try:
            from torchao.prototype.galore.optim.galore_torch import AdamW as TorchaoGaLore
            classes["torchao_galore"] = TorchaoGaLore
            status["torchao_galore"] = "ok (torchao.prototype.galore AdamW)"
        except Exception as exc:  # noqa: BLE001
            status["torchao_galore"] = (f"unavailable: {type(exc).__name__}: {exc} (torchao "
                                        "0.18 ships no GaLore optimizer)")
    return classes, status


def make_opts(W0, G, rank, gap, peers, status):
    """Each optimizer on its own copy of the parameter, one step taken (state and basis in
    place), then its refresh switched off so that timed steps are refresh-free. thresher
    runs with its defaults (only rank, gap, lr and GaLore's scale set)."""
    out = {}

    def param():
        p = torch.nn.Parameter(W0.clone())
        p.grad = G.clone()
        return p

    p = param()
    out["thresher"] = (p, LowRankAdam([p], lr=1e-3, rank=rank, update_proj_gap=gap, scale=0.25))
    for name, cls in peers.items():
        p = param()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = (p, cls([{"params": [p], "rank": rank, "update_proj_gap": gap,
                                      "scale": 0.25, "proj_type": "std"}], lr=1e-3))
        except Exception as exc:  # noqa: BLE001
            status[name] = f"failed to construct: {type(exc).__name__}: {exc}"
    p = param()
    out["adamw_foreach"] = (p, torch.optim.AdamW([p], lr=1e-3, foreach=True))
    p = param()
    try:
        out["adamw_fused"] = (p, torch.optim.AdamW([p], lr=1e-3, fused=True))
    except (RuntimeError, ValueError) as exc:  # no fused AdamW for this device/dtype
        status["adamw_fused"] = f"unavailable: {exc}"
    for name in list(out):
        p, o = out[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o.step()
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            status[name] = f"failed to step: {type(exc).__name__}: {exc}"
            del out[name]
            continue
        if name == "thresher":
            o.param_groups[0]["update_proj_gap"] = 10**9
        elif "projector" in o.state[p]:  # galore-torch and torchao's port keep one per param
            o.state[p]["projector"].update_proj_gap = 10**9
        else:
            o.param_groups[0]["update_proj_gap"] = 10**9
    return out


def work_model(p, q, r, elt, oversample=None):
    """(bytes, FLOPs) of the minimal work per kernel family (module docstring)."""
    big, small = max(p, q), min(p, q)
    k = r + (max(8, r // 8) if oversample is None else oversample)
    return {
        "step": (elt * (3 * p * q + 2 * small * r + 8 * r * big), 4.0 * p * q * r + 12.0 * r * big),
        "adamw": (elt * 7 * p * q, 12.0 * p * q),
        "refresh_power": (elt * (2 * p * q + 2 * small * r), 4.0 * p * q * r + 4.0 * small * r * r),
        "refresh_random": (elt * 6 * p * q, 12.0 * p * q * k),
    }


def run_case(p, q, rank, args, dev, dtype, peers, status, peaks):
    side = choose_side((p, q))
    sync = C.synchronizer(dev)
    G32, base = synthetic_gradient(p, q, args.alpha, seed=p * 7 + q, device=dev)
    Gp32, _ = synthetic_gradient(p, q, args.alpha, seed=p * 7 + q + 1, base=base, device=dev)
    del base
    G, G_prev = G32.to(dtype), Gp32.to(dtype)
    W0 = (torch.randn(p, q, generator=torch.Generator().manual_seed(1)) * 0.02).to(dev, dtype)
    opts = make_opts(W0, G, rank, args.gap, peers, status)
    Q = opts["thresher"][1].state[opts["thresher"][0]]["Q"]
    low = project(G, Q, side)
    # the two-GEMM floor, into preallocated buffers
    R_buf, B_buf = torch.empty_like(low), torch.empty_like(G)
    if side == "left":
        floor = lambda: (torch.mm(Q.T, G, out=R_buf), torch.mm(Q, R_buf, out=B_buf))  # noqa: E731
    else:
        floor = lambda: (torch.mm(G, Q, out=R_buf), torch.mm(R_buf, Q.T, out=B_buf))  # noqa: E731
    calls = {f"step_{k}": v[1].step for k, v in opts.items()}
    calls["floor_2gemm"] = floor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in calls.values():  # warm-up (Triton compiles here)
            fn()
        sync()
        reps = max(3, args.repeats)
        min_s = 0.05 if dev.type == "cpu" else 0.02
        t = C.time_interleaved(calls, repeats=reps, min_sample_s=min_s, device=dev)
    # refreshes: thresher's default (warm power), randomised, exact
    Q_prev = refresh_projection(G_prev, rank, side=side, method="svd")
    ref_calls = {
        "refresh_power": lambda: refresh_projection(G, rank, side=side, method="power",
                                                    prev=Q_prev),
        "refresh_random": lambda: refresh_projection(G, rank, side=side, method="random", seed=3),
    }
    for fn in ref_calls.values():
        fn()
    t.update(C.time_interleaved(ref_calls, repeats=reps, min_sample_s=min_s, device=dev))
    peaks_mem = {}
    if not args.no_memory:
        for k, fn in ref_calls.items():
            peaks_mem[k] = C.measure_peak_memory(fn, device=dev)[1]
    # the full SVDs: thresher's exact option and galore-torch's projector (slow: few samples)
    box = {}

    def thresher_svd():
        box["S"] = refresh_projection(G, rank, side=side, method="svd")

    svd_calls = {"refresh_svd": thresher_svd}
    if "galore" in peers:
        from galore_torch.galore_projector import GaLoreProjector
        proj = GaLoreProjector(rank, proj_type="std")

        def galore_svd():
            box["B"] = proj.get_orthogonal_matrix(G, min(p, q), side)

        svd_calls["refresh_galore_svd"] = galore_svd
        if dev.type == "cpu" and torch.get_num_threads() > 1:  # credit galore with the faster
            def galore_svd_1thread():
                n = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    galore_svd()
                finally:
                    torch.set_num_threads(n)
            svd_calls["refresh_galore_svd_1thread"] = galore_svd_1thread
    first = {}
    for k, fn in svd_calls.items():  # the first call of each: peak memory + one sample
        _, peak, _, ms = C.measure_peak_memory(fn, device=dev)
        peaks_mem[k], first[k] = peak, ms
    t.update(C.time_interleaved(svd_calls, repeats=args.svd_repeats, min_sample_s=0.0,
                                device=dev, first_samples_ms=first))
    if "refresh_galore_svd_1thread" in t:
        t["refresh_galore_svd_torch_threads"] = t["refresh_galore_svd"]
        t["refresh_galore_svd"] = min(t["refresh_galore_svd"], t.pop("refresh_galore_svd_1thread"),
                                      key=lambda x: x.median_ms)
        peaks_mem.pop("refresh_galore_svd_1thread", None)
    Q_svd = box["S"] if dtype == torch.float32 else refresh_projection(G32, rank, side=side,
                                                                       method="svd")
    e_svd = energy(Q_svd, G32, side)
    e_rand = energy(refresh_projection(G, rank, side=side, method="random", seed=3), G32, side)
    e_pow = energy(refresh_projection(G, rank, side=side, method="power", prev=Q_prev), G32, side)
    e_galore = None
    if "B" in box:
        B = box["B"]  # all min(p, q) singular vectors; the top-r are its first r
        e_galore = energy((B.T if side == "right" else B)[:, :rank].contiguous(), G32, side)
    if not args.no_memory:  # peak transient memory of one step, above what is resident
        for k, (par, o) in opts.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peaks_mem[f"step_{k}"] = C.measure_peak_memory(o.step, device=dev)[1]
    m = {k: v.median_ms for k, v in t.items()}
    get = m.get
    row = dict(device=dev.type, dtype=C.dtype_name(dtype), shape=f"{p}x{q}", rank=rank,
               side=side, gap=args.gap, alpha=args.alpha,
               **{f"{k}_ms": v for k, v in m.items()},
               **{f"{k}_p20_ms": v.p20_ms for k, v in t.items()},
               **{f"{k}_p80_ms": v.p80_ms for k, v in t.items()},
               **{f"peak_{k}_bytes": v for k, v in peaks_mem.items()},
               state_thresher_bytes=opts["thresher"][1].state_bytes()["total"],
               **{f"state_{k}_bytes": state_bytes(o) for k, (_, o) in opts.items()
                  if k != "thresher"},
               energy_svd=e_svd, energy_galore_svd=e_galore, energy_thresher_random=e_rand,
               energy_thresher_power=e_pow,
               energy_ratio_random=e_rand / e_svd, energy_ratio_power=e_pow / e_svd)
    step_t = m["step_thresher"]
    for k in ("power", "random", "svd"):
        row[f"amortised_thresher_{k}_ms"] = step_t + m[f"refresh_{k}"] / args.gap
    if "step_galore" in m and "refresh_galore_svd" in m:
        row["amortised_galore_ms"] = m["step_galore"] + m["refresh_galore_svd"] / args.gap
        for k in ("power", "random", "svd"):
            row[f"speedup_amortised_{k}_vs_galore"] = (row["amortised_galore_ms"]
                                                      / row[f"amortised_thresher_{k}_ms"])
            row[f"speedup_refresh_{k}_vs_galore"] = m["refresh_galore_svd"] / m[f"refresh_{k}"]
        row["speedup_step_vs_galore"] = m["step_galore"] / step_t
        row["galore_step_over_floor"] = m["step_galore"] / m["floor_2gemm"]
    row["step_over_floor"] = step_t / m["floor_2gemm"]
    # achieved fractions of the device's peaks (work model in the module docstring)
    model = work_model(p, q, rank, G.element_size())
    bw, fl = peaks["bytes_per_s"], peaks["flop_per_s"] if dtype != torch.float32 else None
    for key, mkey in [(k, "step") for k in m if k.startswith("step_") and "adamw" not in k] + \
                     [(k, "adamw") for k in m if k.startswith("step_adamw")] + \
                     [("refresh_power", "refresh_power"), ("refresh_random", "refresh_random")]:
        nbytes, flops = model[mkey]
        sec = get(key) * 1e-3
        row[f"{key}_bytes_per_s"] = nbytes / sec
        row[f"{key}_flop_per_s"] = flops / sec
        row[f"{key}_bw_frac"] = nbytes / sec / bw if bw else None
        row[f"{key}_flop_frac"] = flops / sec / fl if fl else None
    sync()
    return row


def gpu_section(p, q, r, with_aot):
    """What a GPU-less machine can say about the GPU path of one step at (p, q, r): bytes and
    FLOPs per kernel and the H100 roofline time (bf16 storage: tensor cores; the GEMM-epilogue
    update kernel reads W (and G in LoRDO mode) once and writes W once), plus registers and
    spills of every Triton kernel AOT-compiled for sm_90."""
    side = choose_side((p, q))
    big, small = (q, p) if side == "left" else (p, q)  # R is r x big
    b = 2  # bf16
    rows = []
    for name, nbytes, flops in (
        ("projection GEMM (cuBLAS)", b * (p * q + small * r + r * big), 2.0 * p * q * r),
        ("moments (Triton/CUDA)", b * 6 * r * big + 4 * big, 10.0 * r * big),
        ("update GEMM+epilogue (Triton), GaLore", b * (2 * p * q + small * r + r * big),
         2.0 * p * q * r),
        ("update GEMM+epilogue (Triton), LoRDO", b * (3 * p * q + small * r + r * big) + 4 * small,
         2.0 * p * q * r + 2.0 * p * q),
    ):
        rows.append({"kernel": name, "bytes": nbytes, "flops": flops,
                     "h100_us": 1e6 * C.roofline_seconds(bytes_moved=nbytes, flops=flops)})
    aot = []
    if with_aot:
        try:
            from thresher.kernels import lowrank as K
            aot = K.aot_compile_stats(90)
        except Exception as exc:  # noqa: BLE001 - no triton / ptxas: say so
            aot = [{"error": f"{type(exc).__name__}: {exc}"}]
    return rows, aot


def _ms(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _mib(b):
    return f"{b / C.MiB:.1f}"


def _pct(v):
    return f"{100 * v:.1f}%"


HEADLINE_COLUMNS = [
    ("shape", "shape"), ("rank", "r"),
    ("step_thresher_ms", "step thresher ms", _ms), ("step_galore_ms", "step GaLore ms", _ms),
    ("refresh_power_ms", "refresh thresher (default) ms", _ms),
    ("refresh_galore_svd_ms", "refresh GaLore SVD ms", _ms),
    ("speedup_refresh_power_vs_galore", "refresh speed-up", ".1f"),
    ("amortised_thresher_power_ms", "amortised thresher ms", _ms),
    ("amortised_galore_ms", "amortised GaLore ms", _ms),
    ("speedup_amortised_power_vs_galore", "amortised speed-up", ".2f"),
    ("energy_ratio_power", "energy vs SVD", ".4f"),
    ("peak_step_thresher_bytes", "step peak thresher MiB", _mib),
    ("peak_step_galore_bytes", "step peak GaLore MiB", _mib),
]
OPTION_COLUMNS = [
    ("shape", "shape"), ("rank", "r"),
    ("refresh_power_ms", "power (default) ms", _ms), ("refresh_random_ms", "random ms", _ms),
    ("refresh_svd_ms", "exact svd ms", _ms), ("refresh_galore_svd_ms", "GaLore SVD ms", _ms),
    ("energy_ratio_power", "power/SVD energy", ".4f"),
    ("energy_ratio_random", "random/SVD energy", ".4f"),
    ("amortised_thresher_power_ms", "amort. power ms", _ms),
    ("amortised_thresher_random_ms", "amort. random ms", _ms),
    ("amortised_thresher_svd_ms", "amort. svd ms", _ms),
    ("amortised_galore_ms", "amort. GaLore ms", _ms),
    ("peak_refresh_power_bytes", "peak power MiB", _mib),
    ("peak_refresh_svd_bytes", "peak svd MiB", _mib),
    ("peak_refresh_galore_svd_bytes", "peak GaLore SVD MiB", _mib),
]
STEP_COLUMNS = [
    ("shape", "shape"), ("rank", "r"),
    ("step_thresher_ms", "thresher ms", _ms), ("step_galore_ms", "GaLore ms", _ms),
    ("step_torchao_galore_ms", "torchao GaLore ms", _ms),
    ("step_adamw_foreach_ms", "AdamW foreach ms", _ms),
    ("step_adamw_fused_ms", "AdamW fused ms", _ms),
    ("floor_2gemm_ms", "2-GEMM floor ms", _ms), ("step_over_floor", "thresher/floor", ".2f"),
    ("step_thresher_bytes_per_s", "thresher GB/s", lambda v: f"{v / 1e9:.1f}"),
    ("step_thresher_flop_per_s", "thresher TFLOP/s", lambda v: f"{v / 1e12:.2f}"),
    ("step_thresher_bw_frac", "thresher BW % peak", _pct),
    ("step_thresher_flop_frac", "thresher FLOP % peak", _pct),
    ("step_galore_bw_frac", "GaLore BW % peak", _pct),
    ("step_adamw_fused_bw_frac", "AdamW fused BW % peak", _pct),
    ("refresh_power_flop_frac", "power refresh FLOP % peak", _pct),
    ("state_thresher_bytes", "state thresher MiB", _mib),
    ("state_galore_bytes", "state GaLore MiB", _mib),
    ("state_adamw_foreach_bytes", "state AdamW MiB", _mib),
]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dtype = C.DTYPES[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    if args.quick and not (args.shapes or args.ranks):
        cases = [HEADLINE if dev.type == "cuda" else ((1024, 1024), 128)]
    if args.quick:
        args.repeats = min(args.repeats, 3 if dev.type == "cpu" else 10)
        args.svd_repeats = 1 if dev.type == "cpu" else min(args.svd_repeats, 2)
        args.no_memory = args.no_memory or dev.type == "cpu"
    if args.headline:
        cases = [HEADLINE]
    elif not args.quick or args.shapes or args.ranks:
        shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x"))
                                                 for s in args.shapes.split(",")]
        ranks = RANKS if not args.ranks else [int(r) for r in args.ranks.split(",")]
        cases = [(s, r) for s in shapes for r in ranks]
    peers, status = load_peers()
    peaks = device_peaks(dev)
    meta = C.collect_metadata(device=dev if dev.type == "cuda" else None, gap=args.gap,
                              alpha=args.alpha, device_type=dev.type, dtype=C.dtype_name(dtype),
                              device_peaks=peaks, peers=status)
    out: list[str] = []

    def say(text=""):
        print(text, flush=True)
        out.append(text)

    where = (f"{peaks['name']}" if dev.type == "cuda" else
             f"{meta['cpu_model']}, {meta['cpus_usable']} usable cores ({meta['torch_threads']} "
             "torch threads)")
    say(f"# thresher low-rank Adam benchmark\n\n{where}, torch {meta['torch']}, commit "
        f"{(meta['git_commit'] or 'unknown')[:12]}{' (dirty)' if meta['git_dirty'] else ''}; "
        f"{C.dtype_name(dtype)}; gap {args.gap}; gradient spectrum i^-{args.alpha} + 1% noise. "
        f"Peaks: {peaks['source']}"
        + (f" ({peaks['bytes_per_s'] / 1e9:.0f} GB/s" if peaks["bytes_per_s"] else " (none")
        + (f", {peaks['flop_per_s'] / 1e12:.0f} TFLOP/s bf16)" if peaks["flop_per_s"] else ")")
        + "\n")
    rows, t0 = [], time.perf_counter()
    for (p, q), r in cases:
        print(f"  {p}x{q} rank {r} ...", flush=True)
        rows.append(run_case(p, q, r, args, dev, dtype, peers, status, peaks))
    say("Peers: " + "; ".join(f"{k}: {v}" for k, v in status.items()) + "\n")
    say("## thresher's defaults (proj='power') vs galore-torch's GaLoreAdamW\n")
    say(C.markdown_table(rows, HEADLINE_COLUMNS))
    say("\n## Refresh options (thresher's exact proj='svd' is the opt-in)\n")
    say(C.markdown_table(rows, OPTION_COLUMNS))
    say("\n## Step: time, state, fraction of the device's peak (work model in the docstring)\n")
    say(C.markdown_table(rows, STEP_COLUMNS))
    h = next((r for r in rows if r["shape"] == "2048x5632" and r["rank"] == 256), None)
    if h is not None and "amortised_galore_ms" in h:
        say(f"\nAt 2048x5632, rank 256, gap {args.gap}, defaults against GaLoreAdamW: refresh "
            f"{h['speedup_refresh_power_vs_galore']:.1f}x faster (energy "
            f"{h['energy_ratio_power']:.4f} of the SVD's; the randomised first refresh "
            f"{h['energy_ratio_random']:.4f}), step {h['speedup_step_vs_galore']:.2f}x, "
            f"amortised step {h['speedup_amortised_power_vs_galore']:.2f}x (target >= 1.25x); "
            f"the exact option's amortised step {h['speedup_amortised_svd_vs_galore']:.2f}x.")
    aot = []
    if dev.type == "cpu":
        gp, gq, gr = (2048, 5632, 256) if not args.quick else (1024, 1024, 128)
        groof, aot = gpu_section(gp, gq, gr, with_aot=not args.quick)
        say(f"\nGPU path at {gp}x{gq}, rank {gr}, bf16 (H100 roofline: 3.35 TB/s, 990 TFLOP/s):")
        say(C.markdown_table(groof, [("kernel", "kernel"),
                                     ("bytes", "MB", lambda v: f"{v / 1e6:.1f}"),
                                     ("flops", "GFLOP", lambda v: f"{v / 1e9:.2f}"),
                                     ("h100_us", "H100 us", ".1f")]))
        if aot:
            say("\nTriton kernels AOT-compiled for sm_90:")
            say(C.markdown_table(aot, [("kernel", "kernel"), ("dtype", "dtype"),
                                       ("num_warps", "warps"), ("n_regs", "registers"),
                                       ("n_spills", "spill bytes"), ("error", "error")]))
    else:
        groof = []
    name = NAME + ("_quick" if args.quick else "") + ("_cuda" if dev.type == "cuda" else "")
    paths = C.write_results(args.out, name, rows, meta, gpu_roofline=groof, triton_aot_sm90=aot)
    md = Path(args.out) / f"{name}.md"
    md.write_text("\n".join(out) + "\n")
    print(f"\nwrote {md}, {paths['csv']} and {paths['json']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
