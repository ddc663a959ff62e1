"""``thresher score``: score every sample of a pool with BLISS or a baseline.

Steps (each resumable with ``--resume``):

1. read, tokenise and pack the pool and the target (``embedded`` = the embedded corpus) ->
   ``OUT/pool_samples/``, ``OUT/target_samples/`` (``Samples.save``) and ``OUT/data.json``;
2. ``build_scorer(method, ...).fit(pool, target, checkpoint_dir=OUT/ckpt, resume=...)``
   (the scorer checkpoints each trained model; a resumed fit loads them);
3. ``score`` in shards of ``--shard-size`` samples -> ``OUT/shards/scores-KKKKKK.npy``; a
   resumed run keeps the shards already written. Under ``torchrun`` (``RANK``/``WORLD_SIZE``
   set) rank r scores the shards k with k % WORLD_SIZE == r (every rank fits the same models
   from the same seed; only scoring is split);
4. when all shards exist: ``OUT/scores.npy`` (float32, one per pool sample, aligned with
   ``pool_samples/doc_index.npy`` and ``offset.npy``), ``OUT/doc_scores.npy`` (float64 mean
   over each document's samples, NaN for a document without a sample) and
   ``OUT/manifest.json``. ``thresher select`` merges the shards itself if a rank could not.

Every file is written atomically (temp file, fsync, rename). ``OUT/run.json`` holds the
settings, including a content fingerprint of the pool and the target
(:mod:`thresher.data.runs`); ``--resume`` refuses to continue a run with different settings
or changed inputs, and ``thresher select`` refuses a pool whose content changed.
"""
from __future__ import annotations

import argparse
import functools
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
from thresher.data.embedded import embedded_size_arg
from thresher.data.runs import check_run_folder, fingerprint, record_run

MANIFEST_VERSION = 1
METHODS = ("bliss", "color", "miniplm", "excess", "loss", "random", "qurating")


class CommandError(ValueError):
    """A user-facing error: printed as ``thresher <cmd>: error: ...``, exit status 2."""


# ----------------------------------------------------------------------------------------
# corpus sources (shared with select_cmd)


def source_spec(path: str, *, text_field: str, split: str, hf_split, corpus_seed: int, embedded_size,
                role: str) -> dict:
    """A JSON-able description of a corpus that :func:`open_source` can read again."""
    if path == "embedded":
        return {"path": "embedded", "format": "embedded", "corpus_seed": corpus_seed,
                "embedded_size": embedded_size, "role": role, "text_field": "text"}
    from thresher.data import detect_format, resolve_split

    p = Path(path)
    if not p.exists():
        raise CommandError(f"--{role}: no such file or folder: {path!r}")
    fmt = detect_format(p)
    spec = {"path": str(p.resolve()), "format": fmt, "text_field": text_field, "role": role,
            "fingerprint": fingerprint(p)}
    if fmt == "txt":
        spec["split"] = resolve_split(p, split)
    if fmt == "hf":
        spec["hf_split"] = hf_split
    return spec


def _embedded(spec: dict):
    size = spec["embedded_size"]
    return _embedded_cached(int(spec["corpus_seed"]), int(size) if str(size).isdigit() else size)


@functools.lru_cache(maxsize=2)
def _embedded_cached(seed: int, size):
    # built once per process: the command reads the pool twice (BPE training, packing)
    from thresher.data import embedded_corpus

    return embedded_corpus(seed, size)


def open_source(spec: dict):
    """An iterator over the documents of a corpus described by :func:`source_spec`."""
    from thresher.data import read_documents

    if spec["format"] == "embedded":
        corpus = _embedded(spec)
        return iter(corpus.pool if spec["role"] == "pool" else corpus.target)
    return read_documents(spec["path"], spec["text_field"], split=spec.get("split", "auto"),
                          format=spec["format"], hf_split=spec.get("hf_split"))


# ----------------------------------------------------------------------------------------
# arguments


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help=f"scorer: one of {', '.join(METHODS)}")
    parser.add_argument("--pool", required=True,
                        help="pool corpus: .jsonl, .parquet, .txt, a folder of text files, a HF "
                             "dataset folder, or 'embedded' (the embedded corpus)")
    parser.add_argument("--target", required=True, help="target corpus (same forms as --pool)")
    parser.add_argument("--out", required=True, help="output folder (scores, manifest, checkpoints)")
    parser.add_argument("--text-field", default="text", help="text field/column of jsonl, parquet, HF (default: text)")
    parser.add_argument("--target-text-field", default=None, help="text field of the target (default: --text-field)")
    parser.add_argument("--split", default="auto",
                        help="how a single .txt is cut into documents: auto, wikitext, paragraph[:MIN_CHARS], "
                             "lines:N, file (default auto: wikitext if it has ' = Title = ' lines, else "
                             "paragraphs merged to >= 1000 characters)")
    parser.add_argument("--target-split", default="auto", help="--split for a .txt target (default auto)")
    parser.add_argument("--hf-split", default=None, help="split of a saved HF DatasetDict")
    parser.add_argument("--embedded-size", default="default", type=embedded_size_arg, help="size of the embedded corpus: quick, default or a number")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of the embedded corpus (default 0)")
    parser.add_argument("--tokenizer", default="bpe",
                        help="bpe (trained on the pool, cached), byte, or a local HF tokenizer path")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    parser.add_argument("--cache-dir", default=None, help="tokenizer cache (default $THRESHER_CACHE or ~/.cache/thresher)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="scorer seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for the scorer (default cpu)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g = parser.add_argument_group("method options (passed to build_scorer only when given)")
    g.add_argument("--steps", type=int, default=None, help="training steps of the method's models")
    g.add_argument("--batch-size", type=int, default=None, help="training batch size")
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--model", default=None, help="proxy model: preset (tiny, small, base) or a local HF folder")
    g.add_argument("--opt", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="any other scorer option; VALUE is parsed as JSON when it can be (repeatable)")
    parser.add_argument("--score-batch-size", type=int, default=64, help="batch size when scoring (default 64)")
    parser.add_argument("--shard-size", type=int, default=65536,
                        help="samples per score shard: the unit of resume and of the split across ranks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args) -> dict:
    opts = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                              ("lr", args.lr), ("model", args.model)) if v is not None}
    for key, value in args.opt:
        opts[key] = value
    return opts


# ----------------------------------------------------------------------------------------


def run(args) -> int:
    return _run(args)


def check_device(device: str) -> None:
    """``--device`` names a device this torch can use (checked before any work)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CommandError(f"--device {device!r}: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device!r}: CUDA is not available (a CPU build of torch, or no "
                               "GPU visible); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device!r}: MPS is not available; use --device cpu")


def _check_method(args) -> None:
    """Builds the scorer once with a provisional vocabulary so that a bad --method or option
    fails before anything is written (the real one is built after the data step)."""
    import thresher.selection as selection

    methods = selection.available_methods()
    if args.method not in methods:
        raise CommandError(f"--method must be one of {', '.join(methods)}, got {args.method!r}")
    try:
        selection.build_scorer(args.method, vocab_size=max(args.vocab_size, 260), seed=args.seed,
                               device=args.device, **_options(args))
    except (TypeError, ValueError) as e:
        raise CommandError(f"--method {args.method} rejects its options (--steps/--batch-size/--lr/--model/"
                           f"--opt): {e}") from None


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _run(args) -> int:
    t0 = time.perf_counter()
    progress = not args.no_progress
    if args.seq_len < 2:
        raise CommandError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.shard_size < 1 or args.score_batch_size < 1:
        raise CommandError("--shard-size and --score-batch-size must be positive")
    if args.tokenizer == "bpe" and args.vocab_size < 260:
        raise CommandError(f"--vocab-size must be >= 260 for the BPE tokenizer (256 bytes + 2 specials + "
                           f"merges), got {args.vocab_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out!r} exists and is not a folder")
    check_device(args.device)
    _check_method(args)
    pool_spec = source_spec(args.pool, text_field=args.text_field, split=args.split, hf_split=args.hf_split,
                            corpus_seed=args.corpus_seed, embedded_size=args.embedded_size, role="pool")
    target_spec = source_spec(args.target, text_field=args.target_text_field or args.text_field,
                              split=args.target_split, hf_split=args.hf_split,
                              corpus_seed=args.corpus_seed, embedded_size=args.embedded_size, role="target")
    settings = {"method": args.method, "options": _options(args), "pool": pool_spec, "target": target_spec,
                "tokenizer": args.tokenizer, "vocab_size": args.vocab_size, "seq_len": args.seq_len,
                "seed": args.seed, "shard_size": args.shard_size}
    rank, world = _rank_world()
    # under torchrun the ranks start together: another rank may have written run.json
    check_run_folder(out, settings, resume=args.resume, shared=world > 1)
    out.mkdir(parents=True, exist_ok=True)

    # 1. data --------------------------------------------------------------------------
    data = _prepare_data(args, out, pool_spec, target_spec, progress)
    record_run(out, settings)  # after the data: a run that failed on its inputs can be redone
    t_data = time.perf_counter()
    from thresher.data import Samples

    pool = Samples.load(out / "pool_samples", mmap=True)
    target = Samples.load(out / "target_samples", mmap=True)

    # 2. fit -----------------------------------------------------------------------------
    import thresher.selection as selection

    scorer = selection.build_scorer(args.method, vocab_size=data["tokenizer"]["vocab_size"], seed=args.seed,
                                    device=args.device, **settings["options"])
    scorer.fit(pool, target, checkpoint_dir=out / "ckpt", resume=args.resume, progress=progress)
    t_fit = time.perf_counter()

    # 3. score shards ------------------------------------------------------------------------
    n_shards = max(1, -(-len(pool) // args.shard_size))
    mine = [k for k in range(n_shards) if k % world == rank]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"score shards (rank {rank})" if world > 1 else "score shards", unit="shard")
    for k in mine:
        lo, hi = k * args.shard_size, min(len(pool), (k + 1) * args.shard_size)
        path = _shard_path(out, k)
        if not (args.resume and _shard_ok(path, hi - lo)):
            s = np.asarray(scorer.score(pool[lo:hi], batch_size=args.score_batch_size), dtype=np.float32)
            if s.shape != (hi - lo,):
                raise ValueError(f"scorer {args.method!r} returned shape {s.shape} for {hi - lo} samples")
            save_npy(path, s)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    t_score = time.perf_counter()
    timings = {"data_s": t_data - t0, "fit_s": t_fit - t_data, "score_s": t_score - t_fit}

    # 4. merge ---------------------------------------------------------------------------
    missing = finalize(out, timings=timings)
    if missing:
        print(f"thresher score: rank {rank} done; waiting for shards {missing} from other ranks "
              "(thresher select merges them)", file=sys.stderr)
        return 0
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    print(f"scored {c['pool_samples']} samples of {c['pool_docs']} documents with {args.method} "
          f"in {t_score - t0:.1f} s -> {out / 'scores.npy'}")
    return 0


def _prepare_data(args, out: Path, pool_spec: dict, target_spec: dict, progress: bool) -> dict:
    data_file = out / "data.json"
    if args.resume and data_file.is_file() and (out / "pool_samples" / "samples.json").is_file() \
            and (out / "target_samples" / "samples.json").is_file():
        return json.loads(data_file.read_text())
    from thresher.data import load_tokenizer, pack

    t = time.perf_counter()
    read = [0]
    try:
        tok = load_tokenizer(args.tokenizer, train_docs=_reading(open_source(pool_spec), read)
                             if args.tokenizer == "bpe" else None,
                             vocab_size=args.vocab_size, cache_dir=args.cache_dir)
    except _ReadError as e:  # the pool itself is bad (a wrong field, bad JSON): not the tokenizer's fault
        raise e.__cause__ from None
    except ValueError as e:
        if args.tokenizer == "bpe" and "hold no text" in str(e):
            if read[0] == 0:
                raise CommandError(f"--pool {pool_spec['path']!r} holds no documents (empty corpus)") from None
            raise CommandError(f"--pool {pool_spec['path']!r}: every document is empty (no text to train "
                               "the BPE tokenizer on)") from None
        raise CommandError(f"--tokenizer {args.tokenizer!r}: {e}") from None
    t_tok = time.perf_counter() - t
    counts = {}
    try:
        for role, spec in (("pool", pool_spec), ("target", target_spec)):
            t = time.perf_counter()
            # streamed to disk batch by batch and memory-mapped: a pool larger than memory works
            samples = pack(open_source(spec), tok, args.seq_len, out=out / f"{role}_samples", progress=progress,
                           desc=f"tokenise+pack {role}")
            dt = time.perf_counter() - t
            if samples.n_docs == 0:
                raise CommandError(f"--{role} {spec['path']!r} holds no documents (empty corpus)")
            if len(samples) == 0:
                raise CommandError(f"--{role} {spec['path']!r}: every document is empty (no samples)")
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
