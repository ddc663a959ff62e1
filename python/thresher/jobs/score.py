"""Pool scoring as a Python object: ``ScoreJob(ScoreConfig(method=..., pool=..., target=...,
out=...)).run()`` tokenises the pool and target, fits the scorer, scores the pool in shards
and writes ``scores.npy``, ``doc_scores.npy`` and ``manifest.json``; every step resumes.

``thresher score`` is this job behind argparse (flags = fields). Outputs, sharding under
torchrun and the resume rules: docs/api.md#scoring.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from thresher.core.files import save_json, save_npy
from thresher.data.runs import record_run
from thresher.jobs.config import JobConfig, JobError
from thresher.jobs.folders import open_out
from thresher.jobs.sources import embedded_size, open_source, source_spec

__all__ = ["ScoreConfig", "ScoreJob", "METHODS", "MANIFEST_VERSION", "finalize", "check_device"]

MANIFEST_VERSION = 1
METHODS = ("bliss", "color", "miniplm", "excess", "loss", "random", "qurating")


@dataclasses.dataclass
class ScoreConfig(JobConfig):
    """One scoring run (``thresher score --help`` says what each field does)."""

    method: str                        # scorer: one of METHODS (or a registered one)
    pool: str                          # .jsonl, .parquet, .txt, folder, HF dataset folder, 'embedded'
    target: str                        # same forms as pool
    out: str                           # scores, manifest, checkpoints
    text_field: str = "text"
    target_text_field: str | None = None  # default: text_field
    split: str = "auto"                # how one .txt is cut into documents
    target_split: str = "auto"
    hf_split: str | None = None        # split of a saved HF DatasetDict
    embedded_size: str | int = "default"
    corpus_seed: int = 0               # seed of the embedded corpus
    tokenizer: str = "bpe"             # bpe (trained on the pool, cached), byte, or a local HF path
    vocab_size: int = 4096
    cache_dir: str | None = None       # tokenizer cache (default $THRESHER_CACHE or ~/.cache/thresher)
    seq_len: int = 128
    seed: int = 0                      # scorer seed
    device: str = "cpu"                # torch device of the scorer
    resume: bool = False
    # method options, passed to build_scorer only when given
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    model: str | None = None           # proxy model: preset or a local HF folder
    opt: dict = dataclasses.field(default_factory=dict)  # any other scorer option
    score_batch_size: int = 64
    shard_size: int = 65536            # samples per shard: the unit of resume and of the rank split
    no_progress: bool = False

    def options(self) -> dict:
        """The method options given (what ``build_scorer`` gets besides vocab and seed)."""
        opts = {k: v for k, v in (("steps", self.steps), ("batch_size", self.batch_size),
                                  ("lr", self.lr), ("model", self.model)) if v is not None}
        opts.update(self.opt)
        return opts

    def validate(self) -> None:
        """What can be checked before a file is written (errors name the flag)."""
        self._check_at_least(2, "seq_len")
        self._check_at_least(1, "shard_size", "score_batch_size")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            raise JobError(f"--vocab-size must be >= 260 for the BPE tokenizer (256 bytes + 2 specials + "
                           f"merges), got {self.vocab_size}")
        if "embedded" in (self.pool, self.target):
            embedded_size(self.embedded_size)
            self._check_at_least(0, "corpus_seed")
        # the method options the scorer only uses when it fits (after the data step)
        self._check_at_least(0, "steps")
        self._check_at_least(1, "batch_size")
        if self.lr is not None and not (np.isfinite(self.lr) and self.lr > 0):
            raise JobError(f"--lr must be a positive number, got {self.lr}")
        if self.model is not None and not Path(self.model).exists():
            from thresher.models.gpt import GPTConfig

            try:
                GPTConfig.preset(self.model, 260)
            except ValueError as e:
                raise JobError(f"--model must be a preset or a local HF folder: {e}") from None
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise JobError(f"--out {self.out!r} exists and is not a folder")
        check_device(self.device)
        _check_method(self)


def check_device(device: str) -> None:
    """``--device`` names a device this torch can use (checked before any work)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise JobError(f"--device {device!r}: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise JobError(f"--device {device!r}: CUDA is not available (a CPU build of torch, or no "
                           "GPU visible); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise JobError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise JobError(f"--device {device!r}: MPS is not available; use --device cpu")


def _check_method(cfg) -> None:
    """Builds the scorer once with a provisional vocabulary so that a bad --method or option
    fails before anything is written (the real one is built after the data step)."""
    import thresher.selection as selection

    methods = selection.available_methods()
    if cfg.method not in methods:
        raise JobError(f"--method must be one of {', '.join(methods)}, got {cfg.method!r}")
    try:
        selection.build_scorer(cfg.method, vocab_size=max(cfg.vocab_size, 260), seed=cfg.seed,
                               device=cfg.device, **cfg.options())
    except (TypeError, ValueError) as e:
        raise JobError(f"--method {cfg.method} rejects its options (--steps/--batch-size/--lr/--model/"
                       f"--opt): {e}") from None


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ScoreJob:
    """Scores the pool of ``config``. ``run()`` does every step and returns the manifest (None
    on a torchrun rank whose peers still score: ``thresher select`` merges their shards);
    ``prepare``, ``fit``, ``score`` and ``finalize`` are the steps, in that order."""

    def __init__(self, config: ScoreConfig):
        if not isinstance(config, ScoreConfig):
            raise TypeError(f"config must be a ScoreConfig, got {type(config).__name__}")
        self.config = config
        self.out = Path(config.out)
        self.timings: dict = {}
        self.scorer = None

    @property
    def progress(self) -> bool:
        return not self.config.no_progress

    def prepare(self) -> None:
        """Validates the config, records the run and tokenises + packs pool and target."""
        cfg = self.config
        t0 = time.perf_counter()
        cfg.validate()
        self.pool_spec = source_spec(cfg.pool, text_field=cfg.text_field, split=cfg.split,
                                     hf_split=cfg.hf_split, corpus_seed=cfg.corpus_seed,
                                     embedded_size=cfg.embedded_size, role="pool")
        self.target_spec = source_spec(cfg.target, text_field=cfg.target_text_field or cfg.text_field,
                                       split=cfg.target_split, hf_split=cfg.hf_split,
                                       corpus_seed=cfg.corpus_seed, embedded_size=cfg.embedded_size,
                                       role="target")
        self.settings = {"method": cfg.method, "options": cfg.options(), "pool": self.pool_spec,
                         "target": self.target_spec, "tokenizer": cfg.tokenizer,
                         "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "seed": cfg.seed,
                         "shard_size": cfg.shard_size}
        self.rank, self.world = _rank_world()
        # under torchrun the ranks start together: another rank may have written run.json
        open_out(self.out, self.settings, resume=cfg.resume, shared=self.world > 1,
                 pre_run=("pool_samples", "target_samples", "data.json"))
        self.data = _prepare_data(cfg, self.out, self.pool_spec, self.target_spec, self.progress)
        record_run(self.out, self.settings)  # after the data: a run that failed on its inputs can be redone
        self.timings["data_s"] = time.perf_counter() - t0

    def _samples(self, role: str):
        from thresher.data import Samples

        return Samples.load(self.out / f"{role}_samples", mmap=True)

    def fit(self):
        """Builds and fits the scorer (its checkpoints in OUT/ckpt; resumed with ``resume``)."""
        import thresher.selection as selection

        cfg = self.config
        t0 = time.perf_counter()
        self.scorer = selection.build_scorer(cfg.method, vocab_size=self.data["tokenizer"]["vocab_size"],
                                             seed=cfg.seed, device=cfg.device, **self.settings["options"])
        self.scorer.fit(self._samples("pool"), self._samples("target"), checkpoint_dir=self.out / "ckpt",
                        resume=cfg.resume, progress=self.progress)
        self.timings["fit_s"] = time.perf_counter() - t0
        return self.scorer

    def score(self) -> None:
        """Scores this rank's shards (shard k on rank k % WORLD_SIZE); a resumed run keeps
        the shards already written."""
        cfg = self.config
        t0 = time.perf_counter()
        pool = self._samples("pool")
        n_shards = max(1, -(-len(pool) // cfg.shard_size))
        mine = [k for k in range(n_shards) if k % self.world == self.rank]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), unit="shard", desc=f"score shards (rank {self.rank})"
                       if self.world > 1 else "score shards")
        for k in mine:
            lo, hi = k * cfg.shard_size, min(len(pool), (k + 1) * cfg.shard_size)
            path = _shard_path(self.out, k)
            if not (cfg.resume and _shard_ok(path, hi - lo)):
                s = np.asarray(self.scorer.score(pool[lo:hi], batch_size=cfg.score_batch_size),
                               dtype=np.float32)
                if s.shape != (hi - lo,):
                    raise ValueError(f"scorer {cfg.method!r} returned shape {s.shape} for {hi - lo} samples")
                save_npy(path, s)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.timings["score_s"] = time.perf_counter() - t0

    def finalize(self) -> list[int]:
        """Merges the shards into scores.npy, doc_scores.npy and manifest.json; returns the
        missing shard numbers (then nothing is written)."""
        return finalize(self.out, timings=self.timings)

    def run(self) -> dict | None:
        self.prepare()
        self.fit()
        self.score()
        missing = self.finalize()
        if missing:
            print(f"thresher score: rank {self.rank} done; waiting for shards {missing} from other "
                  "ranks (thresher select merges them)", file=sys.stderr)
            return None
        manifest = json.loads((self.out / "manifest.json").read_text())
        c = manifest["counts"]
        total = sum(self.timings.values())
        print(f"scored {c['pool_samples']} samples of {c['pool_docs']} documents with "
              f"{self.config.method} in {total:.1f} s -> {self.out / 'scores.npy'}")
        return manifest


def _prepare_data(cfg: "ScoreConfig", out: Path, pool_spec: dict, target_spec: dict, progress: bool) -> dict:
    data_file = out / "data.json"
    if cfg.resume and data_file.is_file() and (out / "pool_samples" / "samples.json").is_file() \
            and (out / "target_samples" / "samples.json").is_file():
        return json.loads(data_file.read_text())
    from thresher.data import load_tokenizer, pack

    t = time.perf_counter()
    read = [0]
    try:
        tok = load_tokenizer(cfg.tokenizer, train_docs=_reading(open_source(pool_spec), read)
                             if cfg.tokenizer == "bpe" else None,
                             vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir)
    except _ReadError as e:  # the pool itself is bad (a wrong field, bad JSON): not the tokenizer's fault
        raise e.__cause__ from None
    except ValueError as e:
        if cfg.tokenizer == "bpe" and "hold no text" in str(e):
            if read[0] == 0:
                raise JobError(f"--pool {pool_spec['path']!r} holds no documents (empty corpus)") from None
            raise JobError(f"--pool {pool_spec['path']!r}: every document is empty (no text to train "
                           "the BPE tokenizer on)") from None
        raise JobError(f"--tokenizer {cfg.tokenizer!r}: {e}") from None
    t_tok = time.perf_counter() - t
    counts = {}
    try:
        for role, spec in (("pool", pool_spec), ("target", target_spec)):
            t = time.perf_counter()
            # streamed to disk batch by batch and memory-mapped: a pool larger than memory works
            samples = pack(open_source(spec), tok, cfg.seq_len, out=out / f"{role}_samples", progress=progress,
                           desc=f"tokenise+pack {role}")
            dt = time.perf_counter() - t
            if samples.n_docs == 0:
                raise JobError(f"--{role} {spec['path']!r} holds no documents (empty corpus)")
            if len(samples) == 0:
                raise JobError(f"--{role} {spec['path']!r}: every document is empty (no samples)")
            counts[role] = {"docs": samples.n_docs, "samples": len(samples), "tokens": samples.num_tokens,
                            "docs_without_samples": int(samples.n_docs - len(np.unique(samples.doc_index))),
                            "pack_s": round(dt, 3)}
            del samples
    except BaseException:  # a bad input: leave no half-prepared data behind
        for role in ("pool", "target"):
            shutil.rmtree(out / f"{role}_samples", ignore_errors=True)
        raise
    data = {"tokenizer": {"spec": tok.spec, "kind": tok.kind, "path": tok.path, "vocab_size": tok.vocab_size,
                          "eos_id": tok.eos_id, "pad_id": tok.pad_id, "load_s": round(t_tok, 3)},
            "counts": counts}
    save_json(data_file, data)
    return data


class _ReadError(Exception):
    """An error raised while reading a corpus (its cause is the reader's own error)."""


def _reading(docs, count: list):
    """``docs``, counting them in ``count[0]``; a reader error comes out as ``_ReadError``."""
    it = iter(docs)
    while True:
        try:
            doc = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise _ReadError() from e
        count[0] += 1
        yield doc


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"scores-{k:06d}.npy"


def _shard_ok(path: Path, n: int) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape == (n,)
    except (OSError, ValueError):
        return False


def finalize(out: str | os.PathLike, timings: dict | None = None) -> list[int]:
    """Merge the score shards of a run into scores.npy, doc_scores.npy and manifest.json.
    Returns the missing shard numbers (nothing is written then)."""
    from thresher.data import Samples
    from thresher.data.packing import reduce_by_document

    out = Path(out)
    settings = json.loads((out / "run.json").read_text())
    data = json.loads((out / "data.json").read_text())
    pool = Samples.load(out / "pool_samples", mmap=True)  # only the small per-sample arrays are read
    shard = settings["shard_size"]
    n_shards = max(1, -(-len(pool) // shard))
    sizes = [min(len(pool), (k + 1) * shard) - k * shard for k in range(n_shards)]
    missing = [k for k in range(n_shards) if not _shard_ok(_shard_path(out, k), sizes[k])]
    if missing:
        return missing
    scores = np.concatenate([np.load(_shard_path(out, k)) for k in range(n_shards)]).astype(np.float32)
    if np.isnan(scores).any():
        raise ValueError(f"scorer {settings['method']!r} produced NaN scores "
                         f"({int(np.isnan(scores).sum())} of {len(scores)} samples)")
    doc_scores = reduce_by_document(scores.astype(np.float64), pool.doc_index, pool.n_docs, "mean")
    save_npy(out / "scores.npy", scores)
    save_npy(out / "doc_scores.npy", doc_scores)
    c = data["counts"]
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "method": settings["method"],
        "options": settings["options"],
        "seed": settings["seed"],
        "pool": settings["pool"],
        "target": settings["target"],
        "tokenizer": data["tokenizer"],
        "seq_len": settings["seq_len"],
        "counts": {"pool_docs": c["pool"]["docs"], "pool_samples": c["pool"]["samples"],
                   "pool_tokens": c["pool"]["tokens"], "pool_docs_without_samples": c["pool"]["docs_without_samples"],
                   "target_docs": c["target"]["docs"], "target_samples": c["target"]["samples"],
                   "target_tokens": c["target"]["tokens"], "shards": n_shards},
        "files": {"scores": "scores.npy", "doc_scores": "doc_scores.npy",
                  "doc_index": "pool_samples/doc_index.npy", "offset": "pool_samples/offset.npy",
                  "lengths": "pool_samples/lengths.npy", "pool_samples": "pool_samples",
                  "target_samples": "target_samples", "checkpoints": "ckpt"},
        "doc_scores_reduce": "mean",
        "timings": timings or {},
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_json(out / "manifest.json", manifest)
    return []


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("thresher", "torch", "tokenizers", "pyarrow"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def _git_commit() -> str | None:
    """The commit of the thresher source tree, when it is a git checkout (+ '-dirty')."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
