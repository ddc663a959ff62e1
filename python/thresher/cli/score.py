"""``thresher score``: the pool-scoring job (:mod:`thresher.jobs.score`) behind argparse.

    thresher score --method bliss --pool pool.jsonl --target target.jsonl --out runs/bliss

Every flag is the ``ScoreConfig`` field of the same name (``--opt KEY=VALUE`` fills
``opt``); outputs and resume are described in docs/api.md#scoring.
"""
from __future__ import annotations

import argparse
import json

from thresher.data.embedded import embedded_size_arg
from thresher.jobs.score import METHODS, ScoreConfig


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # one set of defaults, the config's (--opt collects KEY=VALUE pairs first)
    parser.set_defaults(**{k: v for k, v in ScoreConfig.defaults().items() if k != "opt"})
    parser.add_argument("--method", required=True, help=f"scorer: one of {', '.join(METHODS)}")
    parser.add_argument("--pool", required=True,
                        help="pool corpus: .jsonl, .parquet, .txt, a folder of text files, a HF "
                             "dataset folder, or 'embedded' (the embedded corpus)")
    parser.add_argument("--target", required=True, help="target corpus (same forms as --pool)")
    parser.add_argument("--out", required=True, help="output folder (scores, manifest, checkpoints)")
    parser.add_argument("--text-field", help="text field/column of jsonl, parquet, HF (default: text)")
    parser.add_argument("--target-text-field", help="text field of the target (default: --text-field)")
    parser.add_argument("--split",
                        help="how a single .txt is cut into documents: auto, wikitext, paragraph[:MIN_CHARS], "
                             "lines:N, file (default auto: wikitext if it has ' = Title = ' lines, else "
                             "paragraphs merged to >= 1000 characters)")
    parser.add_argument("--target-split", help="--split for a .txt target (default auto)")
    parser.add_argument("--hf-split", help="split of a saved HF DatasetDict")
    parser.add_argument("--embedded-size", type=embedded_size_arg, help="size of the embedded corpus: quick, default or a number")
    parser.add_argument("--corpus-seed", type=int, help="seed of the embedded corpus (default 0)")
    parser.add_argument("--tokenizer",
                        help="bpe (trained on the pool, cached), byte, or a local HF tokenizer path")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    parser.add_argument("--cache-dir", help="tokenizer cache (default $THRESHER_CACHE or ~/.cache/thresher)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default 128)")
    parser.add_argument("--seed", type=int, help="scorer seed (default 0)")
    parser.add_argument("--device", help="torch device for the scorer (default cpu)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g = parser.add_argument_group("method options (passed to build_scorer only when given)")
    g.add_argument("--steps", type=int, help="training steps of the method's models")
    g.add_argument("--batch-size", type=int, help="training batch size")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--model", help="proxy model: preset (tiny, small, base) or a local HF folder")
    g.add_argument("--opt", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="any other scorer option; VALUE is parsed as JSON when it can be (repeatable)")
    parser.add_argument("--score-batch-size", type=int, help="batch size when scoring (default 64)")
    parser.add_argument("--shard-size", type=int,
                        help="samples per score shard: the unit of resume and of the split across ranks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig.from_namespace(argparse.Namespace(**dict(vars(args), opt=dict(args.opt))))


def run(args) -> int:
    from thresher.jobs.score import ScoreJob

    ScoreJob(config_from_args(args)).run()
    return 0
