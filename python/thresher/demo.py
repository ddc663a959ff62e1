"""``thresher demo``: the whole pipeline on the embedded corpus (or your data), end to end.

    thresher demo                 # about 10 minutes on 2 CPU cores
    thresher demo --quick         # about 2 minutes (what CI runs)
    thresher demo --pool pool.jsonl --target target.jsonl --text-field text --nproc 4

Stages (a progress bar each):

1. data    -- the pool and the target split (embedded: built from this Python's docs and
              source plus labelled corrupted documents); a byte-level BPE trained on both;
              the target is halved: one half guides the selectors, the other is the held-out
              validation set every training run reports.
2. select  -- BLISS, the loss-filtering baseline and random selection score the pool and
              keep ``--fraction`` of its documents (top-k of the per-document mean score).
3. train   -- a fresh small GPT on each selection with LoRDO on ``--nproc`` local gloo ranks
              (same seed, steps and batch for all), and once with DDPAdamW on the BLISS
              selection (the communication baseline).
4. online  -- one short run with BLADE online batch selection over the whole pool.
5. report  -- one table (validation loss, tokens-to-target speedup over random, bytes sent
              per rank, optimizer-state memory, wall time) printed and written to
              ``OUT/report.md`` with the loss curves (``OUT/curves.png``).

Every stage's output is kept in ``--out``; rerunning with ``--resume`` reuses finished stages
(and resumes an interrupted training run from its checkpoint).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# Sizes per mode. quick: what CI runs (<= 2 min on 2 cores); default: <= 10 min.
MODES = {
    "quick": dict(embedded="quick", max_pool_docs=400, vocab=1024, seq_len=64, steps=60,
                  batch=8, eval_every=20,
                  bliss=dict(warmup_steps=80, outer_steps=25, warmup_lr=2e-3,
                             model=dict(d_model=64, n_layers=2, n_heads=2)),
                  loss=dict(steps=150), blade=dict(tau=10, ref_steps=10, ref_lr=3e-3),
                  model=dict(d_model=64, n_layers=2, n_heads=2), sync_every=8, rank=16),
    "default": dict(embedded="default", max_pool_docs=2000, vocab=4096, seq_len=128, steps=200,
                    batch=8, eval_every=40,
                    bliss=dict(warmup_steps=100, outer_steps=30, warmup_lr=2e-3,
                               model=dict(d_model=64, n_layers=2, n_heads=2)),
                    loss=dict(steps=150), blade=dict(tau=25, ref_steps=5, ref_lr=3e-3),
                    model=dict(), sync_every=16, rank=32),
}


@dataclass
class Run:
    name: str
    selection: str
    optimizer: str
    summary: dict
    curve: list = field(default_factory=list)  # [(tokens, val_loss)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default="embedded",
                   help="'embedded' or a path (jsonl, parquet, .txt, folder, HF dataset dir)")
    p.add_argument("--target", default="embedded",
                   help="target documents ('embedded' = the embedded corpus's target split)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--fraction", type=float, default=0.2, help="fraction of the pool to keep")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks for training")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--max-pool-docs", type=int, default=None,
                   help="score at most this many pool documents, evenly spread (default: "
                        "400 with --quick, 2000 otherwise; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    p.add_argument("--out", default="thresher-demo")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in --out")


def _check(args) -> None:
    if not 0.0 < args.fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.max_pool_docs is not None and args.max_pool_docs < 0:
        raise ValueError(f"--max-pool-docs must be >= 0, got {args.max_pool_docs}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for name in ("pool", "target"):
        v = getattr(args, name)
        if v != "embedded" and not Path(v).exists():
            raise ValueError(f"--{name} {v!r}: no such file or folder")
    if (args.pool == "embedded") != (args.target == "embedded"):
        raise ValueError("--pool and --target must both be 'embedded' or both be paths")


# ----------------------------------------------------------------------------------------
# Stage 1: data
# ----------------------------------------------------------------------------------------


def stage_data(args, cfg, out: Path) -> dict:
    from thresher.data import Document, embedded_corpus, load_tokenizer, pack, read_documents, \
        write_documents

    labels = None
    if args.pool == "embedded":
        corpus = embedded_corpus(seed=args.seed, size=cfg["embedded"])
        pool, target, labels = corpus.pool, corpus.target, corpus.labels
    else:
        pool = list(read_documents(args.pool, args.text_field))
        target = list(read_documents(args.target, args.text_field))
    cap = cfg["max_pool_docs"] if args.max_pool_docs is None else args.max_pool_docs
    if cap and len(pool) > cap:  # an even spread keeps the mix of sources and corruptions
        import numpy as np

        keep = np.unique(np.linspace(0, len(pool) - 1, cap).round().astype(np.int64))
        pool = [pool[i] for i in keep]
        labels = None if labels is None else np.asarray(labels)[keep]
    if not pool or len(target) < 2:
        raise ValueError(f"need a non-empty pool and at least 2 target documents, got "
                         f"{len(pool)} and {len(target)}")
    # Halve the target: selectors see one half, every training run validates on the other.
    guide = [d for i, d in enumerate(target) if i % 2 == 0]
    held = [d for i, d in enumerate(target) if i % 2 == 1]
    renum = lambda ds: [Document(i, d.text, d.meta) for i, d in enumerate(ds)]  # noqa: E731
    pool, guide, held = renum(pool), renum(guide), renum(held)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("bpe", train_docs=pool + guide, vocab_size=cfg["vocab"],
                         cache_dir=data / "tokenizer")
    write_documents(pool, data / "pool.jsonl")
    write_documents(held, data / "val.jsonl")
    return dict(pool=pool, labels=labels, tok=tok,
                pool_samples=pack(pool, tok, cfg["seq_len"]),
                guide_samples=pack(guide, tok, cfg["seq_len"]),
                val_path=str(data / "val.jsonl"), pool_path=str(data / "pool.jsonl"),
                sizes=dict(pool_docs=len(pool), target_docs=len(guide), val_docs=len(held)))


# ----------------------------------------------------------------------------------------
# Stage 2: scoring and selection
# ----------------------------------------------------------------------------------------


def stage_select(args, cfg, out: Path, d: dict) -> dict:
    import numpy as np

    from thresher.data import write_documents
    from thresher.selection.base import build_scorer
    from thresher.selection.metrics import auroc
    from thresher.selection.strategies import select_topk

    results = {}
    methods = {"bliss": cfg["bliss"], "loss": dict(cfg["loss"], model=cfg["model"] or "tiny"),
               "random": {}}
    for method, opts in methods.items():
        folder = out / "select" / method
        sel_path = folder / "selected.jsonl"
        t0 = time.perf_counter()
        if not (args.resume and sel_path.exists() and (folder / "doc_scores.npy").exists()):
            scorer = build_scorer(method, vocab_size=d["tok"].vocab_size, seed=args.seed, **opts)
            scorer.fit(d["pool_samples"], d["guide_samples"], checkpoint_dir=folder / "ckpt",
                       resume=args.resume, progress=True)
            scores = scorer.score(d["pool_samples"])
            doc_scores = d["pool_samples"].doc_scores(scores)
            keep = select_topk(doc_scores, args.fraction)
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "doc_scores.npy", doc_scores.astype(np.float32))
            write_documents([d["pool"][i] for i in keep], sel_path)
            (folder / "time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
        doc_scores = np.load(folder / "doc_scores.npy")
        wall = json.loads((folder / "time.json").read_text())["wall_s"]
        keep = select_topk(doc_scores, args.fraction)
        info = dict(path=str(sel_path), docs=len(keep), wall_s=wall)
        if d["labels"] is not None:
            info["auroc"] = auroc(doc_scores, ~np.asarray(d["labels"], dtype=bool))
            info["corrupt_kept"] = float(np.asarray(d["labels"])[keep].mean())
        results[method] = info
    return results


# ----------------------------------------------------------------------------------------
# Stage 3/4: training
# ----------------------------------------------------------------------------------------


def _train(args, cfg, out: Path, d: dict, name: str, corpus: str, optimizer: str,
           extra: list[str] = ()) -> Run:
    from thresher.optim import train_cmd

    steps = args.steps or cfg["steps"]
    argv = ["--corpus", corpus, "--val-corpus", d["val_path"], "--tokenizer", d["tok"].path,
            "--seq-len", str(cfg["seq_len"]), "--model", "tiny", "--steps", str(steps),
            "--batch-size", str(cfg["batch"]), "--eval-every", str(cfg["eval_every"]),
            "--optimizer", optimizer, "--nproc", str(args.nproc), "--seed", str(args.seed),
            "--rank", str(cfg["rank"]), "--sync-every", str(cfg["sync_every"]),
            "--out", str(out / "train" / name), "--ckpt-every", str(max(steps // 2, 1)),
            "--no-plot", "--threads", "1"]
    for k, flag in (("d_model", "--d-model"), ("n_layers", "--n-layers"), ("n_heads", "--n-heads")):
        if k in cfg["model"]:
            argv += [flag, str(cfg["model"][k])]
    argv += list(extra)
    summary_path = out / "train" / name / "summary.json"
    if args.resume and summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        p = argparse.ArgumentParser()
        train_cmd.add_arguments(p)
        targs = p.parse_args(argv)
        targs.resume = args.resume and (out / "train" / name / "ckpt").exists()
        summary = train_cmd.launch(targs)
    curve = []
    with open(out / "train" / name / "log.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val_loss"):
                curve.append((float(row["tokens"]), float(row["val_loss"])))
    return Run(name, corpus, optimizer, summary, curve)


# ----------------------------------------------------------------------------------------
# Stage 5: report
# ----------------------------------------------------------------------------------------


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def build_table(runs: list[Run], selection: dict, stage_s: dict) -> tuple[list[dict], str]:
    from thresher.selection.metrics import tokens_to_target_speedup

    base = next((r for r in runs if r.name == "random+lordo"), None)
    rows = []
    for r in runs:
        sel = r.name.split("+")[0]
        s = r.summary
        rows.append({
            "run": r.name,
            "selection": sel,
            "optimizer": r.optimizer,
            "val_loss": s.get("final_val_loss"),
            "speedup_vs_random": (tokens_to_target_speedup(base.curve, r.curve)
                                  if base and r.curve and base.curve else None),
            "bytes_per_rank": s.get("comm_bytes_per_rank"),
            "opt_state_bytes": s.get("optimizer_state_bytes"),
            "train_wall_s": s.get("wall_s"),
            "select_wall_s": selection.get(sel, {}).get("wall_s"),
            "auroc": selection.get(sel, {}).get("auroc"),
        })
    head = ("| run | val loss | tokens-to-target vs random | bytes sent / rank | "
            "optimizer state / rank | train s | selection s | corrupted-doc AUROC |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    body = "".join(
        f"| {r['run']} | {f(r['val_loss'], '.4f')} | "
        f"{f(r['speedup_vs_random'], '.2f') + 'x' if r['speedup_vs_random'] is not None else 'n/a'} | "
        f"{_fmt_bytes(r['bytes_per_rank'])} | {_fmt_bytes(r['opt_state_bytes'])} | "
        f"{f(r['train_wall_s'], '.1f')} | {f(r['select_wall_s'], '.1f')} | {f(r['auroc'], '.3f')} |\n"
        for r in rows)
    stages = "| stage | wall s |\n|---|---:|\n" + "".join(
        f"| {k} | {v:.1f} |\n" for k, v in stage_s.items())
    return rows, head + body + "\n" + stages


def plot_curves(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r.curve:
            t, l = zip(*r.curve)
            ax.plot(t, l, marker="o", ms=3, label=r.name)
    ax.set_xlabel("training tokens (all ranks)")
    ax.set_ylabel("validation loss (held-out target)")
    ax.set_title("thresher demo: validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def run(args) -> int:
    _check(args)
    cfg = MODES["quick" if args.quick else "default"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage_s = {}
    t0 = time.perf_counter()
    print("[1/5] data: building the pool and the target split")
    d = stage_data(args, cfg, out)
    stage_s["data"] = time.perf_counter() - t0
    print(f"      pool {d['sizes']['pool_docs']} docs ({len(d['pool_samples'])} samples of "
          f"{cfg['seq_len']} tokens), target {d['sizes']['target_docs']} docs for the "
          f"selectors, {d['sizes']['val_docs']} held out for validation; vocab "
          f"{d['tok'].vocab_size}")

    t0 = time.perf_counter()
    print(f"[2/5] select: BLISS, loss filtering and random keep {args.fraction:.0%} of the pool")
    selection = stage_select(args, cfg, out, d)
    stage_s["select"] = time.perf_counter() - t0
    for m, info in selection.items():
        extra = f", AUROC {info['auroc']:.3f}" if "auroc" in info else ""
        print(f"      {m}: {info['docs']} docs in {info['wall_s']:.1f} s{extra}")

    t0 = time.perf_counter()
    print(f"[3/5] train: a fresh GPT per selection, LoRDO on {args.nproc} gloo ranks "
          f"(+ DDPAdamW on the BLISS selection)")
    runs = [_train(args, cfg, out, d, f"{m}+lordo", selection[m]["path"], "lordo")
            for m in ("random", "loss", "bliss")]
    runs.append(_train(args, cfg, out, d, "bliss+ddp", selection["bliss"]["path"], "ddp"))
    for r in runs:
        r.selection = r.name.split("+")[0]
    stage_s["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("[4/5] online: BLADE selects inside the training loop over the whole pool")
    blade_opts = [x for k, v in cfg["blade"].items() for x in ("--select-opt", f"{k}={v}")]
    runs.append(_train(args, cfg, out, d, "blade+lordo", d["pool_path"], "lordo",
                       ["--select", "blade", *blade_opts]))
    stage_s["online"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows, table = build_table(runs, selection, stage_s)
    plot_curves(runs, out / "curves.png")
    stage_s["report"] = time.perf_counter() - t0
    rows, table = build_table(runs, selection, stage_s)
    report = ("# thresher demo\n\n"
              f"mode: {'quick' if args.quick else 'default'}; pool {args.pool}, target "
              f"{args.target}; {args.nproc} ranks; seed {args.seed}\n\n" + table +
              "\n![validation loss](curves.png)\n")
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"rows": rows, "stages_s": stage_s,
                                                 "sizes": d["sizes"]}, indent=1))
    print("[5/5] report\n")
    print(table)
    print(f"wrote {out / 'report.md'} and {out / 'curves.png'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="thresher demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
