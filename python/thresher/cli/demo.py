"""``thresher demo``: the end-to-end demo (:mod:`thresher.jobs.demo`) behind argparse.

    thresher demo                 # about 8-9 minutes on 2 idle CPU cores, ~320 MB in --out
    thresher demo --quick         # about 2 minutes (what CI runs)
    thresher demo --pool pool.jsonl --target target.jsonl --text-field text --nproc 4
"""
from __future__ import annotations

import argparse

from thresher.jobs.demo import DemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(**DemoConfig.defaults())  # one set of defaults: the config's
    p.add_argument("--pool",
                   help="'embedded' or a path (jsonl, parquet, .txt, folder, HF dataset dir)")
    p.add_argument("--target",
                   help="target documents ('embedded' = the embedded corpus's target split)")
    p.add_argument("--text-field")
    p.add_argument("--fraction", type=float, help="fraction of the pool to keep")
    p.add_argument("--nproc", type=int, help="local gloo ranks for training")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--max-pool-docs", type=int,
                   help="score at most this many pool documents, evenly spread (default: "
                        "400 with --quick, 2000 otherwise; 0 = all)")
    p.add_argument("--seed", type=int)
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true", help="reuse finished stages in --out")


def run(args) -> int:
    from thresher.jobs.demo import DemoJob

    DemoJob(DemoConfig.from_namespace(args)).run()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="thresher demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
