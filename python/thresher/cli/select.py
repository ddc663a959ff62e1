"""``thresher select``: pick documents from the scores of ``thresher score`` and write them.

Sample scores (``scores.npy``) are reduced to one score per document (``--reduce``, default
the mean over the document's samples; a document without a sample gets -inf, i.e. is taken
last). The strategy picks documents: ``topk`` (the top ``--fraction``), ``gumbel``
(Gumbel-top-k at ``--temperature``: a sample without replacement from softmax(score/T)),
``threshold`` (score >= ``--threshold``). The pool is then read again (streaming) and the
selected documents are written to ``--out`` -- in the format its suffix names (.jsonl,
.parquet, .txt, or a folder); when that is the pool's format the source's details are kept
(other jsonl fields, the parquet schema, the text files byte for byte, the .txt split). The
embedded pool is written as jsonl/parquet with its labels (source, kind, corrupted).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from .score import CommandError, _embedded, finalize
from thresher.selection.strategies import STRATEGIES, select_gumbel, select_threshold, select_topk

REDUCTIONS = ("mean", "token_mean", "max", "min", "sum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="output folder of thresher score")
    parser.add_argument("--fraction", type=float, default=None,
                        help="fraction of documents to keep, in (0, 1] (topk, gumbel)")
    parser.add_argument("--strategy", default="topk", choices=STRATEGIES, help="default topk")
    parser.add_argument("--temperature", type=float, default=1.0, help="gumbel temperature (default 1)")
    parser.add_argument("--threshold", type=float, default=None, help="keep documents with score >= this (threshold)")
    parser.add_argument("--seed", type=int, default=0, help="gumbel noise seed (default 0)")
    parser.add_argument("--reduce", default="mean", choices=REDUCTIONS,
                        help="sample scores -> document score (default mean)")
    parser.add_argument("--out", required=True,
                        help="selected documents: .jsonl, .parquet, .txt, or a folder (text files / HF dataset)")
    parser.add_argument("--pool", default=None, help="read the pool from here instead of the path in the manifest "
                                                     "(it must hold the same documents)")
    parser.add_argument("--ids-out", default=None, help="also write the selected document ids (.npy)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out / --ids-out (default: refuse)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    return _run(args)


def load_scores(folder: str | Path, reduce: str = "mean") -> tuple[dict, np.ndarray, np.ndarray]:
    """(manifest, per-sample scores, per-document scores) of a ``thresher score`` folder;
    merges the shards first when a distributed run left that to us."""
    from thresher.data import Samples
    from thresher.data.packing import reduce_by_document

    d = Path(folder)
    if not d.is_dir():
        raise CommandError(f"--scores: no such folder: {str(folder)!r}")
    if not (d / "manifest.json").is_file():
        if not (d / "run.json").is_file() or not (d / "data.json").is_file():
            raise CommandError(f"--scores {str(folder)!r} holds no thresher score output (no manifest.json)")
        missing = finalize(d)
        if missing:
            raise CommandError(f"--scores {str(folder)!r} is incomplete: score shards {missing} are missing; "
                               "finish it with thresher score --resume")
    manifest = json.loads((d / "manifest.json").read_text())
    scores = np.load(d / manifest["files"]["scores"])
    pool = Samples.load(d / manifest["files"]["pool_samples"], mmap=True)
    if scores.shape != (len(pool),):
        raise CommandError(f"--scores: scores.npy has shape {scores.shape}, expected ({len(pool)},)")
    if np.isnan(scores).any():
        raise CommandError("--scores: scores.npy contains NaN")
    doc = reduce_by_document(scores.astype(np.float64), pool.doc_index, pool.n_docs, reduce, pool.lengths)
    return manifest, scores, doc


def _overlaps(a: Path, b: Path) -> bool:
    """a and b are the same path or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def check_output(flag: str, path: Path, *, overwrite: bool, inputs: dict[str, Path], folder: bool | None) -> None:
    """Refuses, before anything is written, an output that would replace or sit inside an
    input, an existing output without --overwrite, and one that cannot be created.
    ``folder``: whether the output is a folder (None: not known)."""
    p = Path(os.path.abspath(path))
    for name, inp in inputs.items():
        inp = Path(os.path.abspath(inp))
        if name == "--scores" and inp in p.parents and not p.exists():
            continue  # a new file beside the scores replaces nothing
        if _overlaps(p, inp):
            raise CommandError(f"{flag} {str(path)!r} would overwrite the input {name} {str(inp)!r}; "
                               "write the selection somewhere else")
    if p.exists():
        if p.is_dir() and folder is False:
            raise CommandError(f"{flag} {str(path)!r} is an existing folder, not a file")
        if not p.is_dir() and folder:
            raise CommandError(f"{flag} {str(path)!r} is an existing file, not a folder")
        if not overwrite and not (p.is_dir() and not any(p.iterdir())):
            raise CommandError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")


def _run(args) -> int:
    from thresher.data.documents import output_is_folder

    if args.strategy == "threshold":
        if args.threshold is None:
            raise CommandError("--strategy threshold needs --threshold")
    elif args.fraction is None:
        raise CommandError(f"--strategy {args.strategy} needs --fraction (in (0, 1])")
    elif not 0.0 < args.fraction <= 1.0:
        raise CommandError(f"--fraction must be in (0, 1], got {args.fraction}")
    manifest, _, doc = load_scores(args.scores, args.reduce)
    pool = dict(manifest["pool"])
    embedded = pool["format"] == "embedded"
    src = None
    if embedded:
        if args.pool is not None:
            raise CommandError("--pool cannot replace the embedded pool")
    else:
        from thresher.data import detect_format

        src = Path(args.pool) if args.pool is not None else Path(pool["path"])
        if not src.exists():
            raise CommandError(f"the pool {str(src)!r} does not exist (moved? pass --pool)")
        if detect_format(src) != pool["format"]:
            raise CommandError(f"the pool {str(src)!r} is not {pool['format']} as when scored")

    # every output is checked before anything is read or written
    out = Path(args.out)
    inputs = {"--scores": Path(args.scores)}
    if src is not None:
        inputs["--pool"] = src
    try:
        out_folder = output_is_folder(out, pool["format"])
    except ValueError as e:
        raise CommandError(f"--out: {e}") from None
    check_output("--out", out, overwrite=args.overwrite, inputs=inputs, folder=out_folder)
    if args.ids_out:
        if Path(os.path.abspath(args.ids_out)) == Path(os.path.abspath(out)):
            raise CommandError("--ids-out and --out name the same file")
        check_output("--ids-out", Path(args.ids_out), overwrite=args.overwrite, inputs=inputs, folder=False)
    if src is not None and pool.get("fingerprint"):
        from thresher.data.runs import fingerprint

        if fingerprint(src) != pool["fingerprint"]:
            raise CommandError(f"the pool {str(src)!r} is not the one that was scored: the pool changed "
                               "since scoring (its content differs), so the scores would select other "
                               "documents; score it again")

    n_docs = len(doc)
    no_sample = np.isnan(doc)
    doc = np.where(no_sample, -np.inf, doc)  # documents without a sample are taken last
    if args.strategy == "topk":
        ids = select_topk(doc, args.fraction)
    elif args.strategy == "gumbel":
        ids = select_gumbel(doc, args.fraction, args.temperature, args.seed)
    else:
        ids = select_threshold(doc, args.threshold)
    if len(ids) == 0:
        finite = doc[np.isfinite(doc)]
        rng = f"; document scores range from {finite.min():.4g} to {finite.max():.4g}" if len(finite) else ""
        raise CommandError(f"--threshold {args.threshold} keeps none of the {n_docs} documents{rng}; "
                           "nothing written")

    if embedded:
        corpus = _embedded(pool)
        if len(corpus.pool) != n_docs:
            raise CommandError(f"the embedded corpus now has {len(corpus.pool)} documents, the scores {n_docs}")
        from thresher.data import write_documents

        write_documents((corpus.pool[int(i)] for i in ids), out, overwrite=args.overwrite)
        labels = corpus.labels
    else:
        from thresher.data import write_selected

        write_selected(src, ids, out, text_field=pool["text_field"], split=pool.get("split", "auto"),
                       hf_split=pool.get("hf_split"), n_docs=n_docs, overwrite=args.overwrite)
        labels = None
    if args.ids_out:
        from thresher.core.files import save_npy

        save_npy(args.ids_out, ids)
    msg = (f"selected {len(ids)} of {n_docs} documents ({len(ids) / n_docs:.1%}) by {args.strategy} "
           f"on {manifest['method']} scores -> {out}")
    if no_sample.any():
        msg += f"; {int(no_sample.sum())} documents had no sample (too short) and rank last"
    if labels is not None and len(ids):
        msg += (f"; corrupted documents: {labels[ids].mean():.1%} of the selection vs "
                f"{labels.mean():.1%} of the pool")
    print(msg)
    return 0
