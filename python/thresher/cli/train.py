"""``thresher train``: the training job (:mod:`thresher.jobs.train`) behind argparse.

    thresher train --optimizer lordo --nproc 4 --model tiny --steps 300 --out runs/train
    torchrun --nproc-per-node 4 -m thresher.cli.train --optimizer diloco ...

Every flag is the ``TrainConfig`` field of the same name; data, outputs and resume are
described in docs/api.md#training.
"""
from __future__ import annotations

import argparse
import json
import sys

from thresher.jobs.train import OPTIMIZERS, TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from thresher.data.embedded import embedded_size_arg

    # one set of defaults, the config's (--select-opt collects KEY=VALUE strings first)
    p.set_defaults(**{k: v for k, v in TrainConfig.defaults().items() if k != "select_opt"})
    g = p.add_argument_group("data")
    g.add_argument("--corpus",
                   help="'embedded' or a path (jsonl, parquet, .txt, folder, HF dataset dir)")
    g.add_argument("--val-corpus", help="validation documents (default: held out)")
    g.add_argument("--text-field")
    g.add_argument("--val-every-nth", type=int,
                   help="without --val-corpus, every n-th document validates")
    g.add_argument("--embedded-size", type=embedded_size_arg, help="'quick' or 'default'")
    g.add_argument("--tokenizer", help="'bpe' (trained, cached), 'byte' or a path")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--data-cache", help="folder for the tokenised samples")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--model", help="GPT preset: tiny, small, base")
    g.add_argument("--d-model", type=int, help="override the preset's width")
    g.add_argument("--n-layers", type=int, help="override the preset's depth")
    g.add_argument("--n-heads", type=int, help="override the preset's heads")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int, help="samples per rank and step")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--warmup", type=int)
    g.add_argument("--schedule", choices=("cosine", "constant"))
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adamw / lowrank-adam are ddp / lowrank-ddp (one rank: no communication)")
    g.add_argument("--rank", type=int, help="low-rank r (lordo, lowrank-*)")
    g.add_argument("--lowrank-embeddings", action="store_true",
                   help="also project the embedding matrix (default: plain Adam, as GaLore)")
    g.add_argument("--sync-every", type=int, help="local steps per sync")
    g.add_argument("--omega", type=float)
    g.add_argument("--mu", type=float)
    g.add_argument("--clip", type=float)
    g.add_argument("--outer", choices=("average", "nesterov"),
                   help="lordo's outer step (default nesterov: better than plain averaging in "
                        "benchmarks/exp_optimizers.py)")
    g.add_argument("--outer-lr", type=float,
                   help="outer SGD lr (default: 0.7 DiLoCo / lordo nesterov, 1.0 SparseLoCo)")
    g.add_argument("--outer-momentum", type=float,
                   help="outer momentum (default: 0.9 DiLoCo / lordo nesterov, 0 SparseLoCo)")
    g.add_argument("--compression", help="lordo: codec for the sync (topk, quant8, ...)")
    g.add_argument("--proj", choices=("svd", "power", "random"))
    g.add_argument("--init-proj", choices=("random", "grad"))
    g.add_argument("--update-proj-gap", type=int, help="lowrank-ddp refresh period")
    g.add_argument("--scale", type=float, help="lowrank-ddp GaLore scale")
    g.add_argument("--topk", type=int, help="sparseloco/topk: values per chunk")
    g.add_argument("--chunk", type=int)
    g.add_argument("--bits", type=int)
    g.add_argument("--ef-beta", type=float, help="sparseloco error decay")
    g = p.add_argument_group("selection")
    g.add_argument("--select",
                   help="online data selection (thresher.selection.online): blade, rho, ...")
    g.add_argument("--select-opt", action="append", default=[], metavar="KEY=VALUE")
    g = p.add_argument_group("run")
    g.add_argument("--nproc", type=int, help="local gloo ranks to spawn")
    g.add_argument("--timeout", type=float, help="collective timeout (s)")
    g.add_argument("--threads", type=int, help="torch threads per rank")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--eval-samples", type=int, help="validation samples (all ranks)")
    g.add_argument("--ckpt-every", type=int)
    g.add_argument("--out")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plot", action="store_true")


def parse_select_opts(items: list[str]) -> dict:
    """``--select-opt KEY=VALUE`` (repeated) -> {KEY: VALUE}; a VALUE that is JSON is parsed."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--select-opt must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        out[k] = v
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = dict(vars(args), select_opt=parse_select_opts(args.select_opt))
    return TrainConfig.from_namespace(argparse.Namespace(**values))


def run(args) -> int:
    from thresher.jobs.train import TrainJob

    print(json.dumps(TrainJob(config_from_args(args)).run(), indent=1))
    return 0


def main(argv=None) -> int:
    """``torchrun ... -m thresher.cli.train ARGS`` = ``thresher train ARGS`` (same errors)."""
    from thresher.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
