"""One table over every configuration ``exp_online_selection.py`` has run into a ``runs/``
folder (each run's JSON carries the options that determine it), so settings tried in
separate invocations (BLADE's reference schedules, K, ...) are compared on the same random
and RHO runs of each seed.

Usage::

    python benchmarks/exp_online_selection_summary.py OUT/runs [--out results_dir]

Prints a markdown table (mean over seeds; "vs RHO" counts the seeds on which the
configuration's held-out loss is below the static RHO-LOSS reference's, RHO-1 for token
level) and, with ``--out``, writes ``summary.csv`` / ``summary.json`` there with every seed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from exp_online_selection import METHODS, metrics  # noqa: E402

# options that describe a configuration in the table (the rest is shared by every run)
_LABEL_KEYS = ("ref_schedule", "tau", "ref_steps", "ref_warmup", "ref_lr", "lam")


def _data_key(cfg: dict) -> str:
    """The options shared by every method of one comparison (data, model, training)."""
    drop = {"method", "seed", "random_mult", *_LABEL_KEYS, "rho_ref_lr", "rho_ref_steps",
            "val_batch"}
    return json.dumps({k: v for k, v in cfg.items() if k not in drop}, sort_keys=True)


def label(cfg: dict) -> str:
    if METHODS[cfg["method"]][0] != "blade":
        return cfg["method"]
    return (f"{cfg['method']} {cfg['ref_schedule']} tau {cfg['tau']} K {cfg['ref_steps']} "
            f"K0 {cfg['ref_warmup']} lr {cfg['ref_lr']:g} lam {cfg['lam']:g}")


def summarise(runs_dir: Path):
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    rand = {(_data_key(r["config"]), r["config"]["seed"]): r["run"] for r in runs
            if r["config"]["method"] == "random"}
    rows = []
    for r in runs:
        cfg, run = r["config"], r["run"]
        base = rand.get((_data_key(cfg), cfg["seed"]))
        if base is None:
            continue
        steps = cfg["steps"]
        if cfg["method"] == "random":  # random at equal tokens: its first `steps` steps
            curve = [p for p in run["curve"] if p[0] <= steps]
            run = {**run, "curve": curve, "final_loss": curve[-1][3], "tokens": curve[-1][1],
                   "flops": curve[-1][2]}
        m = metrics(run, base, steps)
        rows.append({"config": label(cfg), "method": cfg["method"], "seed": cfg["seed"],
                     "data": _data_key(cfg), "final_loss": run["final_loss"],
                     "token_speedup": m["token_speedup"], "compute_ratio": m["compute_ratio"],
                     "random_loss_at_compute": m["random_loss_at_compute"],
                     "compute_speedup": m["compute_speedup"],
                     "compute_speedup_lower_bound": m["compute_speedup_lower_bound"],
                     "domain_share": run["domain_share"]})
    return rows


def table(rows) -> list[dict]:
    ref = {(x["data"], x["seed"], x["method"]): x["final_loss"] for x in rows
           if x["method"] in ("rho", "rho1")}
    out = []
    for name in dict.fromkeys(x["config"] for x in rows):
        rs = sorted((x for x in rows if x["config"] == name), key=lambda x: x["seed"])
        token = METHODS[rs[0]["method"]][1] == "token"
        against = [ref.get((x["data"], x["seed"], "rho1" if token else "rho")) for x in rs]
        wins = sum(b is not None and x["final_loss"] < b for x, b in zip(rs, against))
        known = sum(b is not None for b in against)
        agg = {"config": name, "seeds": " ".join(str(x["seed"]) for x in rs),
               "vs_rho": f"{wins} of {known}" if rs[0]["method"] not in ("rho", "rho1",
                                                                        "random") else ""}
        for k in ("final_loss", "token_speedup", "compute_ratio", "random_loss_at_compute",
                  "compute_speedup", "domain_share"):
            vals = [x[k] for x in rs if x[k] is not None and np.isfinite(x[k])]
            agg[k] = float(np.mean(vals)) if vals else None
        agg["final_loss_per_seed"] = " ".join(f"{x['final_loss']:.3f}" for x in rs)
        out.append(agg)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="the runs/ folder of exp_online_selection.py")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = summarise(args.runs)
    summary = table(rows)
    cols = [("config", "configuration"), ("seeds", "seeds"),
            ("final_loss", "held-out loss", ".3f"), ("final_loss_per_seed", "per seed"),
            ("vs_rho", "below RHO on"), ("token_speedup", "tokens-to-target x", ".2f"),
            ("compute_ratio", "compute / random", ".2f"),
            ("random_loss_at_compute", "random @ same compute", ".3f"),
            ("domain_share", "target share", ".2f")]
    print(C.markdown_table(summary, cols))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = C.collect_metadata(config={"runs": str(args.runs)})
        C.write_results(args.out, "summary", rows, meta, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
