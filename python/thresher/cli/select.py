"""``thresher select``: the selection job (:mod:`thresher.jobs.select`) behind argparse.

    thresher select --scores runs/bliss --fraction 0.2 --out selected.jsonl

Every flag is the ``SelectConfig`` field of the same name; docs/api.md#selection.
"""
from __future__ import annotations

import argparse

from thresher.core.constants import DOCUMENT_REDUCTIONS
from thresher.jobs.select import SelectConfig
from thresher.selection.strategies import STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(**SelectConfig.defaults())  # one set of defaults: the config's
    parser.add_argument("--scores", required=True, help="output folder of thresher score")
    parser.add_argument("--fraction", type=float,
                        help="fraction of documents to keep, in (0, 1] (topk, gumbel)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="default topk")
    parser.add_argument("--temperature", type=float, help="gumbel temperature (default 1)")
    parser.add_argument("--threshold", type=float, help="keep documents with score >= this (threshold)")
    parser.add_argument("--seed", type=int, help="gumbel noise seed (default 0)")
    parser.add_argument("--reduce", choices=DOCUMENT_REDUCTIONS,
                        help="sample scores -> document score (default mean)")
    parser.add_argument("--out", required=True,
                        help="selected documents: .jsonl, .parquet, .txt, or a folder (text files / HF dataset)")
    parser.add_argument("--pool", help="read the pool from here instead of the path in the manifest "
                                                     "(it must hold the same documents)")
    parser.add_argument("--ids-out", help="also write the selected document ids (.npy)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out / --ids-out (default: refuse)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from thresher.jobs.select import SelectJob

    SelectJob(SelectConfig.from_namespace(args)).run()
    return 0
