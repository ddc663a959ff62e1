"""Experiment: LoRDO against the distributed baselines at an equal token budget.

4 gloo ranks on this CPU train the same small GPT (``thresher train``) with DDPAdamW,
LowRankDDP, DiLoCo, SparseLoCo, LoRDO (sync_every 8, 16 and 32, an omega sweep, plain
averaging and the outer Nesterov step) and LoRDO with a compressed sync (quant4, top-k); every run sees the same batches (same seed, same sampler). Reported per run:
final validation loss, bytes sent per rank, wall time, optimizer-state bytes per rank; a
Markdown table, a CSV and a loss-vs-bytes plot in --out. Seeds are fixed; a second seed
(by default only for the headline runs, to keep CPU time down) shows the spread.

    python benchmarks/exp_optimizers.py                 # default corpus, seeds 0 and 1
    python benchmarks/exp_optimizers.py --quick         # 60 steps, one seed
    python benchmarks/exp_optimizers.py --corpus data.jsonl --val-corpus val.jsonl

Default corpus: ../shared/data/wikitext-2 (train on test.txt, validate on valid.txt) when
that folder exists next to the repository, else the embedded corpus. Finished runs are
skipped on a rerun (their summary.json is reused): the experiment resumes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {  # name -> the TrainConfig fields it sets
    "ddp-adamw": dict(optimizer="ddp"),
    "lowrank-ddp": dict(optimizer="lowrank-ddp"),
    "diloco-H16": dict(optimizer="diloco", sync_every=16),
    "sparseloco-H16": dict(optimizer="sparseloco", sync_every=16),
    "lordo-K8-w0.5": dict(optimizer="lordo", sync_every=8, omega=0.5, outer="average"),
    "lordo-K32-w0.5": dict(optimizer="lordo", sync_every=32, omega=0.5, outer="average"),
    "lordo-K8-w0.25": dict(optimizer="lordo", sync_every=8, omega=0.25, outer="average"),
    "lordo-K8-w0.75": dict(optimizer="lordo", sync_every=8, omega=0.75, outer="average"),
    "lordo-K8-quant4": dict(optimizer="lordo", sync_every=8, omega=0.5, compression="quant4",
                            outer="average"),
    "lordo-K8-topk": dict(optimizer="lordo", sync_every=8, omega=0.5, compression="topk",
                          outer="average"),
    "lordo-K8-nesterov": dict(optimizer="lordo", sync_every=8, omega=0.5, outer="nesterov"),
    "lordo-K32-nesterov": dict(optimizer="lordo", sync_every=32, omega=0.5, outer="nesterov"),
    "lordo-K16-nesterov": dict(optimizer="lordo", sync_every=16, omega=0.5, outer="nesterov"),
    "lordo-K10-nesterov": dict(optimizer="lordo", sync_every=10, omega=0.5, outer="nesterov"),
    "lordo-K12-nesterov": dict(optimizer="lordo", sync_every=12, omega=0.5, outer="nesterov"),
    "lordo-K10-w0.75-nesterov": dict(optimizer="lordo", sync_every=10, omega=0.75,
                                     outer="nesterov"),
    "lordo-K10-w0.25-nesterov": dict(optimizer="lordo", sync_every=10, omega=0.25,
                                     outer="nesterov"),
    "lordo-K10-nesterov-olr1": dict(optimizer="lordo", sync_every=10, omega=0.5, outer="nesterov",
                                    outer_lr=1.0),
    "lordo-K10-nesterov-mom0.8": dict(optimizer="lordo", sync_every=10, omega=0.5,
                                      outer="nesterov", outer_momentum=0.8),
    "lordo-K16-nesterov-mom0.8": dict(optimizer="lordo", sync_every=16, omega=0.5,
                                      outer="nesterov", outer_momentum=0.8),
    "lordo-K32-nesterov-mom0.8": dict(optimizer="lordo", sync_every=32, omega=0.5,
                                      outer="nesterov", outer_momentum=0.8),
    "lordo-K8-quant4-nesterov-mom0.8": dict(optimizer="lordo", sync_every=8, omega=0.5,
                                            outer="nesterov", outer_momentum=0.8,
                                            compression="quant4"),
    "lordo-K16-w0.25-nesterov": dict(optimizer="lordo", sync_every=16, omega=0.25,
                                     outer="nesterov"),
    "lordo-K8-quant4-nesterov": dict(optimizer="lordo", sync_every=8, omega=0.5, outer="nesterov",
                                     compression="quant4"),
}
HEADLINE = ["lowrank-ddp", "lordo-K32-w0.5", "lordo-K8-quant4", "lordo-K8-topk",
            "lordo-K16-nesterov", "lordo-K8-quant4-nesterov", "lordo-K10-nesterov",
            "lordo-K12-nesterov", "lordo-K10-w0.75-nesterov", "lordo-K10-w0.25-nesterov",
            "lordo-K10-nesterov-olr1", "lordo-K10-nesterov-mom0.8", "lordo-K16-nesterov-mom0.8",
            "lordo-K32-nesterov-mom0.8", "lordo-K8-quant4-nesterov-mom0.8"]


def default_corpus():
    wt = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")
    if os.path.exists(os.path.join(wt, "test.txt")) and os.path.exists(os.path.join(wt, "valid.txt")):
        return os.path.abspath(os.path.join(wt, "test.txt")), os.path.abspath(os.path.join(wt, "valid.txt"))
    return "embedded", None


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                       text=True).strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None)
    p.add_argument("--val-corpus", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "exp_optimizers"))
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--second-seed-all", action="store_true",
                   help="run every config on every seed (default: seeds after the first run "
                        "only the headline configs)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--quick", action="store_true", help="60 steps, seed 0 only")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--model", default="tiny")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 64, [0]
    corpus, val = (args.corpus, args.val_corpus) if args.corpus else default_corpus()
    os.makedirs(args.out, exist_ok=True)
    from thresher.jobs.train import TrainConfig, TrainJob, plot_loss_vs_bytes

    common = dict(corpus=corpus, val_corpus=val or None, steps=args.steps, lr=args.lr,
                  rank=args.rank, model=args.model, d_model=args.d_model, n_layers=args.n_layers,
                  n_heads=args.n_heads, vocab_size=args.vocab_size, seq_len=args.seq_len,
                  batch_size=args.batch_size, nproc=args.nproc,
                  eval_every=max(8, args.steps // 12), eval_samples=128, ckpt_every=args.steps,
                  warmup=max(4, args.steps // 10), data_cache=os.path.join(args.out, "data"),
                  no_progress=True, no_plot=True, timeout=600.0)
    rows, series = [], []
    for si, seed in enumerate(args.seeds):
        names = args.configs if (si == 0 or args.second_seed_all) else \
            [c for c in args.configs if c in HEADLINE]
        for name in names:
            out = os.path.join(args.out, f"{name}-seed{seed}")
            summary_path = os.path.join(out, "summary.json")
            if not os.path.exists(summary_path):
                config = TrainConfig(**common, **CONFIGS[name], seed=seed, out=out)
                t0 = time.perf_counter()
                print(f"[exp_optimizers] {name} seed {seed} ...", flush=True)
                TrainJob(config).run()
                print(f"[exp_optimizers] {name} seed {seed} done in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            s = json.load(open(summary_path))
            with open(os.path.join(out, "log.csv")) as f:
                log = list(csv.DictReader(f))
            series.append((f"{name} s{seed}", log))
            rows.append({"config": name, "seed": seed, "val_loss": s["final_val_loss"],
                         "bytes_per_rank": s["comm_bytes_per_rank"], "wall_s": s["wall_s"],
                         "opt_state_bytes": s["optimizer_state_bytes"],
                         "params": s["model_parameters"], "tokens": s["tokens"]})
    ref = {r["seed"]: r for r in rows if r["config"] == "lowrank-ddp"}
    for r in rows:
        b = ref.get(r["seed"])
        r["loss_vs_lowrank_ddp_%"] = 100 * (r["val_loss"] / b["val_loss"] - 1) if b else float("nan")
        r["bytes_reduction_x"] = b["bytes_per_rank"] / r["bytes_per_rank"] if b and r["bytes_per_rank"] else float("inf")
    fields = list(rows[0])
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    meta = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "commit": git_commit(), "corpus": corpus, "val_corpus": val, "steps": args.steps,
            "nproc": args.nproc, "seeds": args.seeds}
    try:
        import torch

        import thresher

        meta.update(torch=torch.__version__, thresher=thresher.__version__)
    except Exception:
        pass
    json.dump({"meta": meta, "rows": rows}, open(os.path.join(args.out, "results.json"), "w"),
              indent=1)
    plot_loss_vs_bytes(series, os.path.join(args.out, "loss_vs_bytes.png"))
    print(f"\n{args.nproc} gloo ranks, {rows[0]['params']:,} parameters, {args.steps} steps, "
          f"{rows[0]['tokens']:,} tokens per run, corpus {corpus}; commit {meta['commit']}\n")
    print("| config | seed | val loss | vs LowRankDDP | bytes/rank | fewer bytes | wall s | opt state/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['seed']} | {r['val_loss']:.4f} | "
              f"{r['loss_vs_lowrank_ddp_%']:+.2f}% | {r['bytes_per_rank'] / 2**20:.2f} MiB | "
              f"{r['bytes_reduction_x']:.1f}x | {r['wall_s']:.0f} | "
              f"{(r['opt_state_bytes'] or 0) / 2**10:.0f} KiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
