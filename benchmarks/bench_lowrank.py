#!/usr/bin/env python
"""Benchmark of LowRankAdam (thresher.optim, on thresher.ops.lowrank) against galore-torch's
GaLoreAdamW and torch.optim.AdamW (foreach and fused).

Per matrix shape (1024x1024, 2048x5632, 4096x4096; fp32) and rank (64, 128, 256), timed
interleaved round-robin on the same gradient, medians with p20/p80:

* ``step``: one optimizer step with the basis already in place (no refresh), for
  thresher, GaLoreAdamW and AdamW (foreach, fused);
* ``refresh``: recomputing the basis: thresher's randomised SVD (``proj="random"``: sketch of
  r + max(8, r/8) columns, 2 power iterations, Rayleigh-Ritz) and warm-started power iteration
  (``proj="power"``, one iteration from the previous basis), against galore-torch's full
  ``torch.linalg.svd`` (what GaLoreAdamW runs every ``update_proj_gap`` steps);
* ``amortised`` = step + refresh / gap (gap 200), thresher with ``"random"`` (cold, the
  conservative choice) and with ``"power"``;
* the two-GEMM floor: ``mm(Q^T, G)`` + ``mm(Q, N)`` into preallocated buffers (what any
  projected Adam must do), and thresher's step as a multiple of it;
* optimizer-state bytes (thresher's ``state_bytes()``; every tensor in the others' state);
* captured gradient energy ``||P^T G||^2 / ||G||^2`` for galore-torch's SVD basis and
  thresher's two refreshes (the warm start comes from the previous gradient's SVD basis).

The gradient: a synthetic power-law spectrum, ``G = U diag(i^-alpha) V^T + noise`` with
``U, V`` Gaussian (p x k, q x k, k = min(p, q); near-orthogonal columns at these sizes),
``alpha = 0.5`` by default (``--alpha``; singular-value energy ~ 1/i, a flat, hard case for
a sketch) and white noise of 1% of the signal's RMS. The "previous" gradient for the warm
start is an independent noise draw on the same spectrum plus a 10% perturbation of the
singular vectors.

Examples::

    python benchmarks/bench_lowrank.py --quick        # < 1 min: 1024x1024, rank 128
    python benchmarks/bench_lowrank.py --headline     # 2048x5632, rank 256: the issue's targets
    python benchmarks/bench_lowrank.py                # the whole grid (slow on 2 cores)

Results: a Markdown table on stdout, CSV + JSON in ``--out`` (default bench-results/).
Timings on a shared 2-core machine are noisy: read the ratios, measured in the same run.
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
    ap.add_argument("--quick", action="store_true", help="1024x1024 at rank 128 only (< 1 min)")
    ap.add_argument("--headline", action="store_true", help="2048x5632 at rank 256 only")
    ap.add_argument("--shapes", default=None, help="e.g. 1024x1024,2048x5632")
    ap.add_argument("--ranks", default=None, help="e.g. 64,128,256")
    ap.add_argument("--gap", type=int, default=GAP, help="update_proj_gap (default %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.5, help="spectrum exponent (default 0.5)")
    ap.add_argument("--svd-repeats", type=int, default=3,
                    help="samples of galore-torch's full SVD per shape (slow)")
    return ap.parse_args(argv)


def synthetic_gradient(p, q, alpha, seed, noise=0.01, base=None):
    """Power-law spectrum plus white noise (module docstring). ``base``: (U, V) to perturb."""
    g = torch.Generator().manual_seed(seed)
    k = min(p, q)
    if base is None:
        U = torch.randn(p, k, generator=g) / math.sqrt(p)
        V = torch.randn(q, k, generator=g) / math.sqrt(q)
    else:
        U = base[0] + 0.1 * torch.randn(p, k, generator=g) / math.sqrt(p)
        V = base[1] + 0.1 * torch.randn(q, k, generator=g) / math.sqrt(q)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    G = (U * s) @ V.T
    G += noise * float(G.pow(2).mean().sqrt()) * torch.randn(p, q, generator=g)
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
    return float(project(G, Q, side).double().pow(2).sum() / G.double().pow(2).sum())


def make_opts(W0, G, rank, gap):
    """Each optimizer on its own copy of the parameter, one step taken (state and basis in
    place), then its refresh switched off so that timed steps are refresh-free."""
    from galore_torch import GaLoreAdamW

    out = {}

    def param():
        p = torch.nn.Parameter(W0.clone())
        p.grad = G.clone()
        return p

    p = param()
    o = LowRankAdam([p], lr=1e-3, rank=rank, update_proj_gap=gap, scale=0.25, proj="random")
    out["thresher"] = (p, o)
    p = param()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = GaLoreAdamW([{"params": [p], "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                          "proj_type": "std"}], lr=1e-3)
    out["galore"] = (p, o)
    p = param()
    out["adamw_foreach"] = (p, torch.optim.AdamW([p], lr=1e-3, foreach=True))
    p = param()
    try:
        out["adamw_fused"] = (p, torch.optim.AdamW([p], lr=1e-3, fused=True))
    except (RuntimeError, ValueError) as exc:  # no fused CPU AdamW in this torch
        print(f"  (fused AdamW unavailable: {exc})")
    for name, (p, o) in out.items():
        o.step()
        if name == "thresher":
            o.param_groups[0]["update_proj_gap"] = 10**9
        elif name == "galore":
            o.state[p]["projector"].update_proj_gap = 10**9
    return out


def run_case(p, q, rank, args, svd_cache):
    side = choose_side((p, q))
    G, base = synthetic_gradient(p, q, args.alpha, seed=p * 7 + q)
    G_prev, _ = synthetic_gradient(p, q, args.alpha, seed=p * 7 + q + 1, base=base)
    W0 = torch.randn(p, q, generator=torch.Generator().manual_seed(1)) * 0.02
    opts = make_opts(W0, G, rank, args.gap)
    Q = opts["thresher"][1].state[opts["thresher"][0]]["Q"]
    low = project(G, Q, side)
    # the two-GEMM floor, into preallocated buffers
    R_buf, B_buf = torch.empty_like(low), torch.empty(p, q)
    if side == "left":
        floor = lambda: (torch.mm(Q.T, G, out=R_buf), torch.mm(Q, R_buf, out=B_buf))  # noqa: E731
    else:
        floor = lambda: (torch.mm(G, Q, out=R_buf), torch.mm(R_buf, Q.T, out=B_buf))  # noqa: E731
    calls = {f"step_{k}": v[1].step for k, v in opts.items()}
    calls["floor_2gemm"] = floor
    for fn in calls.values():  # warm-up
        fn()
    reps = max(3, args.repeats)
    t = C.time_interleaved(calls, repeats=reps, min_sample_s=0.05)
    # refreshes
    Q_prev = refresh_projection(G_prev, rank, side=side, method="svd")
    ref_calls = {
        "refresh_random": lambda: refresh_projection(G, rank, side=side, method="random", seed=3),
        "refresh_power": lambda: refresh_projection(G, rank, side=side, method="power",
                                                    prev=Q_prev),
    }
    for fn in ref_calls.values():
        fn()
    t.update(C.time_interleaved(ref_calls, repeats=reps, min_sample_s=0.05))
    key = (p, q)
    if key not in svd_cache:
        # galore's refresh is a full SVD whatever the rank. Timed with torch's thread count
        # and with one thread (LAPACK's small parallel regions suffer on shared cores, see
        # thresher.ops.lowrank._lapack_threads); galore-torch is credited with the faster.
        from galore_torch.galore_projector import GaLoreProjector
        proj = GaLoreProjector(rank, proj_type="std")
        typ = "right" if side == "right" else "left"
        box = {}

        def svd_basis():
            box["B"] = proj.get_orthogonal_matrix(G, min(p, q), typ)

        def svd_basis_1t():
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                svd_basis()
            finally:
                torch.set_num_threads(n)

        svd_t = C.time_interleaved({"svd": svd_basis, "svd_1thread": svd_basis_1t},
                                   repeats=args.svd_repeats, min_sample_s=0.0)
        B = box["B"]  # all min(p, q) singular vectors; the top-r are its first r
        svd_cache[key] = (svd_t, B.T if typ == "right" else B)
    svd_t, full = svd_cache[key]
    t["refresh_galore_svd"] = min(svd_t.values(), key=lambda x: x.median_ms)
    t["refresh_galore_svd_torch_threads"] = svd_t["svd"]
    t["refresh_galore_svd_1thread"] = svd_t["svd_1thread"]
    e_svd = energy(full[:, :rank].contiguous(), G, side)
    e_rand = energy(refresh_projection(G, rank, side=side, method="random", seed=3), G, side)
    e_pow = energy(refresh_projection(G, rank, side=side, method="power", prev=Q_prev), G, side)
    # peak transient memory of one step (in this process, above what is resident)
    peaks = {}
    if not args.no_memory:
        for k, (par, o) in opts.items():
            _, peak, method, _ = C.measure_peak_memory(o.step)
            peaks[k] = peak
    m = {k: v.median_ms for k, v in t.items()}
    step_t = m["step_thresher"]
    row = dict(shape=f"{p}x{q}", rank=rank, side=side, gap=args.gap, alpha=args.alpha,
               **{f"{k}_ms": v for k, v in m.items()},
               **{f"{k}_p20_ms": v.p20_ms for k, v in t.items()},
               **{f"{k}_p80_ms": v.p80_ms for k, v in t.items()},
               amortised_thresher_random_ms=step_t + m["refresh_random"] / args.gap,
               amortised_thresher_power_ms=step_t + m["refresh_power"] / args.gap,
               amortised_galore_ms=m["step_galore"] + m["refresh_galore_svd"] / args.gap,
               state_thresher_bytes=opts["thresher"][1].state_bytes()["total"],
               state_galore_bytes=state_bytes(opts["galore"][1]),
               state_adamw_bytes=state_bytes(opts["adamw_foreach"][1]),
               energy_galore_svd=e_svd, energy_thresher_random=e_rand,
               energy_thresher_power=e_pow,
               **{f"peak_step_{k}_bytes": v for k, v in peaks.items()})
    row["speedup_amortised_vs_galore"] = row["amortised_galore_ms"] / row["amortised_thresher_random_ms"]
    row["speedup_amortised_power_vs_galore"] = row["amortised_galore_ms"] / row["amortised_thresher_power_ms"]
    row["speedup_refresh_random_vs_svd"] = m["refresh_galore_svd"] / m["refresh_random"]
    row["speedup_refresh_power_vs_svd"] = m["refresh_galore_svd"] / m["refresh_power"]
    row["step_over_floor"] = step_t / m["floor_2gemm"]
    row["galore_step_over_floor"] = m["step_galore"] / m["floor_2gemm"]
    row["energy_ratio_random"] = e_rand / e_svd
    row["energy_ratio_power"] = e_pow / e_svd
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


COLUMNS = [
    ("shape", "shape"), ("rank", "r"),
    ("step_thresher_ms", "thresher step ms", ".1f"),
    ("step_galore_ms", "GaLore step ms", ".1f"),
    ("step_adamw_foreach_ms", "AdamW foreach ms", ".1f"),
    ("step_adamw_fused_ms", "AdamW fused ms", ".1f"),
    ("floor_2gemm_ms", "2-GEMM floor ms", ".1f"),
    ("step_over_floor", "thresher/floor", ".2f"),
    ("refresh_random_ms", "refresh rand ms", ".0f"),
    ("refresh_power_ms", "refresh power ms", ".0f"),
    ("refresh_galore_svd_ms", "GaLore SVD ms", ".0f"),
    ("speedup_refresh_random_vs_svd", "SVD/rand", ".1f"),
    ("amortised_thresher_random_ms", "amort. thresher ms", ".1f"),
    ("amortised_galore_ms", "amort. GaLore ms", ".1f"),
    ("speedup_amortised_vs_galore", "speedup", ".2f"),
    ("energy_galore_svd", "energy SVD", ".4f"),
    ("energy_ratio_random", "rand/SVD", ".4f"),
    ("energy_ratio_power", "power/SVD", ".4f"),
    ("state_thresher_bytes", "state thresher MiB", lambda b: f"{b / C.MiB:.2f}"),
    ("state_galore_bytes", "state GaLore MiB", lambda b: f"{b / C.MiB:.2f}"),
    ("state_adamw_bytes", "state AdamW MiB", lambda b: f"{b / C.MiB:.2f}"),
]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        cases = [((1024, 1024), 128)]
        args.repeats = min(args.repeats, 3)
        args.svd_repeats = 1
        args.no_memory = True
    elif args.headline:
        cases = [HEADLINE]
    else:
        shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x"))
                                                 for s in args.shapes.split(",")]
        ranks = RANKS if not args.ranks else [int(r) for r in args.ranks.split(",")]
        cases = [(s, r) for s in shapes for r in ranks]
    meta = C.collect_metadata(gap=args.gap, alpha=args.alpha)
    print(f"# thresher low-rank Adam benchmark\n\n{meta['cpu_model']}, "
          f"{meta['cpus_usable']} usable cores ({meta['torch_threads']} torch threads), torch "
          f"{meta['torch']}, commit {(meta['git_commit'] or 'unknown')[:12]}"
          f"{' (dirty)' if meta['git_dirty'] else ''}; fp32; gap {args.gap}; gradient spectrum "
          f"i^-{args.alpha} + 1% noise\n", flush=True)
    rows, svd_cache, t0 = [], {}, time.perf_counter()
    for (p, q), r in cases:
        print(f"  {p}x{q} rank {r} ...", flush=True)
        rows.append(run_case(p, q, r, args, svd_cache))
    print()
    print(C.markdown_table(rows, COLUMNS))
    h = next((r for r in rows if r["shape"] == "2048x5632" and r["rank"] == 256), None)
    if h is not None:
        print("\nTargets at 2048x5632, rank 256, gap 200:")
        print(f"  refresh (randomised SVD) vs galore-torch full SVD: "
              f"{h['speedup_refresh_random_vs_svd']:.1f}x (target >= 10x), energy "
              f"{h['energy_thresher_random']:.4f} vs {h['energy_galore_svd']:.4f} "
              f"(ratio {h['energy_ratio_random']:.4f}, target >= 0.99); warm power iteration "
              f"{h['speedup_refresh_power_vs_svd']:.1f}x, energy ratio {h['energy_ratio_power']:.4f}")
        print(f"  amortised step vs GaLoreAdamW: {h['speedup_amortised_vs_galore']:.2f}x "
              f"(randomised refresh), {h['speedup_amortised_power_vs_galore']:.2f}x (power); "
              f"target >= 1.25x")
        print(f"  thresher step = {h['step_over_floor']:.2f}x the two-GEMM floor "
              f"(GaLoreAdamW's: {h['galore_step_over_floor']:.2f}x)")
    gp, gq, gr = (2048, 5632, 256) if not args.quick else (1024, 1024, 128)
    groof, aot = gpu_section(gp, gq, gr, with_aot=not args.quick)
    print(f"\nGPU path at {gp}x{gq}, rank {gr}, bf16 (H100 roofline: 3.35 TB/s, 990 TFLOP/s):")
    print(C.markdown_table(groof, [("kernel", "kernel"), ("bytes", "MB", lambda v: f"{v / 1e6:.1f}"),
                                   ("flops", "GFLOP", lambda v: f"{v / 1e9:.2f}"),
                                   ("h100_us", "H100 us", ".1f")]))
    if aot:
        print("\nTriton kernels AOT-compiled for sm_90:")
        print(C.markdown_table(aot, [("kernel", "kernel"), ("dtype", "dtype"),
                                     ("num_warps", "warps"), ("n_regs", "registers"),
                                     ("n_spills", "spill bytes"), ("error", "error")]))
    paths = C.write_results(args.out, NAME + ("_quick" if args.quick else ""), rows, meta,
                            gpu_roofline=groof, triton_aot_sm90=aot)
    print(f"\nwrote {paths['csv']} and {paths['json']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
