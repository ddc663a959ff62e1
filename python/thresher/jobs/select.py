"""Selection as a Python object: ``SelectJob(SelectConfig(scores=..., out=..., fraction=0.2)).run()``
reduces the sample scores of a score job to document scores, picks documents (top-k,
Gumbel-top-k, threshold) and writes them in the pool's own format.

``thresher select`` is this job behind argparse (flags = fields); docs/api.md#selection.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from thresher.core.constants import DOCUMENT_REDUCTIONS
from thresher.jobs.config import JobConfig, JobError
from thresher.jobs.score import finalize
from thresher.jobs.sources import embedded_for
from thresher.selection.strategies import STRATEGIES, select_gumbel, select_threshold, select_topk

__all__ = ["SelectConfig", "SelectJob", "load_scores", "check_output"]


@dataclasses.dataclass
class SelectConfig(JobConfig):
    """One selection (``thresher select --help`` says what each field does)."""

    scores: str                        # output folder of a score job
    out: str                           # .jsonl, .parquet, .txt, or a folder (text files / HF dataset)
    fraction: float | None = None      # fraction of documents to keep, in (0, 1] (topk, gumbel)
    strategy: str = "topk"             # one of STRATEGIES
    temperature: float = 1.0           # gumbel temperature
    threshold: float | None = None     # keep documents with score >= this (threshold)
    seed: int = 0                      # gumbel noise seed
    reduce: str = "mean"               # sample scores -> document score (DOCUMENT_REDUCTIONS)
    pool: str | None = None            # read the pool from here instead of the manifest's path
    ids_out: str | None = None         # also write the selected document ids (.npy)
    overwrite: bool = False            # replace an existing out / ids_out (default: refuse)
    no_progress: bool = False

    def validate(self) -> None:
        """What can be checked before a file is read or written (a JobError names the flag)."""
        if self.strategy not in STRATEGIES:
            raise JobError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.reduce not in DOCUMENT_REDUCTIONS:
            raise JobError(f"--reduce must be one of {', '.join(DOCUMENT_REDUCTIONS)}, got {self.reduce!r}")
        if self.strategy == "threshold":
            if self.threshold is None:
                raise JobError("--strategy threshold needs --threshold")
        elif self.fraction is None:
            raise JobError(f"--strategy {self.strategy} needs --fraction (in (0, 1])")
        elif not 0.0 < self.fraction <= 1.0:
            raise JobError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.threshold is not None and np.isnan(self.threshold):
            raise JobError("--threshold must be a number, got nan")
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise JobError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        self._check_at_least(0, "seed")


def load_scores(folder: str | Path, reduce: str = "mean") -> tuple[dict, np.ndarray, np.ndarray]:
    """(manifest, per-sample scores, per-document scores) of a ``thresher score`` folder;
    merges the shards first when a distributed run left that to us."""
    from thresher.data import Samples
    from thresher.data.packing import reduce_by_document

    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise JobError(f"--scores {str(folder)!r} is a file, not the output folder of thresher score")
    if not d.is_dir():
        raise JobError(f"--scores: no such folder: {str(folder)!r}")
    if not (d / "manifest.json").is_file():
        if not (d / "run.json").is_file() or not (d / "data.json").is_file():
            raise JobError(f"--scores {str(folder)!r} holds no thresher score output (no manifest.json)")
        missing = finalize(d)
        if missing:
            raise JobError(f"--scores {str(folder)!r} is incomplete: score shards {missing} are missing; "
                           "finish it with thresher score --resume")
    manifest = json.loads((d / "manifest.json").read_text())
    scores = np.load(d / manifest["files"]["scores"])
    pool = Samples.load(d / manifest["files"]["pool_samples"], mmap=True)
    if scores.shape != (len(pool),):
        raise JobError(f"--scores: scores.npy has shape {scores.shape}, expected ({len(pool)},)")
    if np.isnan(scores).any():
        raise JobError("--scores: scores.npy contains NaN")
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
            raise JobError(f"{flag} {str(path)!r} would overwrite the input {name} {str(inp)!r}; "
                           "write the selection somewhere else")
    if p.exists():
        if p.is_dir() and folder is False:
            raise JobError(f"{flag} {str(path)!r} is an existing folder, not a file")
        if not p.is_dir() and folder:
            raise JobError(f"{flag} {str(path)!r} is an existing file, not a folder")
        if not overwrite and not (p.is_dir() and not any(p.iterdir())):
            raise JobError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise JobError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JobError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")


class SelectJob:
    """Selects from the scores of ``config.scores`` and writes ``config.out``; ``run()``
    returns the selected document ids with counts and the one-line summary it prints."""

    def __init__(self, config: SelectConfig):
        if not isinstance(config, SelectConfig):
            raise TypeError(f"config must be a SelectConfig, got {type(config).__name__}")
        self.config = config

    def run(self) -> dict:
        from thresher.data.documents import output_is_folder

        cfg = self.config
        cfg.validate()
        manifest, _, doc = load_scores(cfg.scores, cfg.reduce)
        pool = dict(manifest["pool"])
        embedded = pool["format"] == "embedded"
        src = None
        if embedded:
            if cfg.pool is not None:
                raise JobError("--pool cannot replace the embedded pool")
        else:
            from thresher.data import detect_format

            src = Path(cfg.pool) if cfg.pool is not None else Path(pool["path"])
            if not src.exists():
                raise JobError(f"the pool {str(src)!r} does not exist (moved? pass --pool)")
            if detect_format(src) != pool["format"]:
                raise JobError(f"the pool {str(src)!r} is not {pool['format']} as when scored")

        # every output is checked before anything is read or written
        out = Path(cfg.out)
        inputs = {"--scores": Path(cfg.scores)}
        if src is not None:
            inputs["--pool"] = src
        try:
            out_folder = output_is_folder(out, pool["format"])
        except ValueError as e:
            raise JobError(f"--out: {e}") from None
        check_output("--out", out, overwrite=cfg.overwrite, inputs=inputs, folder=out_folder)
        if cfg.ids_out:
            if Path(os.path.abspath(cfg.ids_out)) == Path(os.path.abspath(out)):
                raise JobError("--ids-out and --out name the same file")
            check_output("--ids-out", Path(cfg.ids_out), overwrite=cfg.overwrite, inputs=inputs, folder=False)
        if src is not None and pool.get("fingerprint"):
            from thresher.data.runs import fingerprint

            if fingerprint(src) != pool["fingerprint"]:
                raise JobError(f"the pool {str(src)!r} is not the one that was scored: the pool changed "
                               "since scoring (its content differs), so the scores would select other "
                               "documents; score it again")

        n_docs = len(doc)
        no_sample = np.isnan(doc)
        doc = np.where(no_sample, -np.inf, doc)  # documents without a sample are taken last
        if cfg.strategy == "topk":
            ids = select_topk(doc, cfg.fraction)
        elif cfg.strategy == "gumbel":
            ids = select_gumbel(doc, cfg.fraction, cfg.temperature, cfg.seed)
        else:
            ids = select_threshold(doc, cfg.threshold)
        if len(ids) == 0:
            finite = doc[np.isfinite(doc)]
            rng = f"; document scores range from {finite.min():.4g} to {finite.max():.4g}" if len(finite) else ""
            raise JobError(f"--threshold {cfg.threshold} keeps none of the {n_docs} documents{rng}; "
                           "nothing written")

        if embedded:
            corpus = embedded_for(pool)
            if len(corpus.pool) != n_docs:
                raise JobError(f"the embedded corpus now has {len(corpus.pool)} documents, the scores {n_docs}")
            from thresher.data import write_documents

            write_documents((corpus.pool[int(i)] for i in ids), out, overwrite=cfg.overwrite)
            labels = corpus.labels
        else:
            from thresher.data import write_selected

            write_selected(src, ids, out, text_field=pool["text_field"], split=pool.get("split", "auto"),
                           hf_split=pool.get("hf_split"), n_docs=n_docs, overwrite=cfg.overwrite)
            labels = None
        if cfg.ids_out:
            from thresher.core.files import save_npy

            save_npy(cfg.ids_out, ids)
        msg = (f"selected {len(ids)} of {n_docs} documents ({len(ids) / n_docs:.1%}) by {cfg.strategy} "
               f"on {manifest['method']} scores -> {out}")
        if no_sample.any():
            msg += f"; {int(no_sample.sum())} documents had no sample (too short) and rank last"
        if labels is not None and len(ids):
            msg += (f"; corrupted documents: {labels[ids].mean():.1%} of the selection vs "
                    f"{labels.mean():.1%} of the pool")
        print(msg)
        return {"selected": len(ids), "documents": n_docs, "ids": ids, "out": str(out), "message": msg}
