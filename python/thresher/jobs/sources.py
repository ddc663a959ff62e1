"""Corpus sources a job records and reads again: ``source_spec`` describes a corpus (path,
format, text field, split, content fingerprint) as JSON; ``open_source`` streams its documents.
The score job records both specs in its manifest; the select job reads the pool back from it."""
from __future__ import annotations

import functools
from pathlib import Path

from thresher.data.runs import fingerprint
from thresher.jobs.config import JobError

__all__ = ["source_spec", "open_source", "embedded_for", "embedded_size"]


def embedded_size(value, flag: str = "--embedded-size"):
    """The embedded corpus size a config names (``thresher.data.embedded.embedded_size``'s
    rule), or a JobError naming ``flag``."""
    from thresher.data.embedded import embedded_size as checked

    try:
        return checked(value, flag)
    except (TypeError, ValueError) as e:
        raise JobError(str(e)) from None


def source_spec(path: str, *, text_field: str, split: str, hf_split, corpus_seed: int, embedded_size,
                role: str) -> dict:
    """A JSON-able description of a corpus that :func:`open_source` can read again."""
    if path == "embedded":
        return {"path": "embedded", "format": "embedded", "corpus_seed": corpus_seed,
                "embedded_size": embedded_size, "role": role, "text_field": "text"}
    from thresher.data import detect_format, resolve_split

    p = Path(path)
    if not p.exists():
        raise JobError(f"--{role}: no such file or folder: {path!r}")
    fmt = detect_format(p)
    spec = {"path": str(p.resolve()), "format": fmt, "text_field": text_field, "role": role,
            "fingerprint": fingerprint(p)}
    if fmt == "txt":
        spec["split"] = resolve_split(p, split)
    if fmt == "hf":
        spec["hf_split"] = hf_split
    return spec


def embedded_for(spec: dict):
    """The embedded corpus a spec names (built once per process)."""
    return _embedded_cached(int(spec["corpus_seed"]), embedded_size(spec["embedded_size"]))


@functools.lru_cache(maxsize=2)
def _embedded_cached(seed: int, size):
    # built once per process: the command reads the pool twice (BPE training, packing)
    from thresher.data import embedded_corpus

    return embedded_corpus(seed, size)


def open_source(spec: dict):
    """An iterator over the documents of a corpus described by :func:`source_spec`."""
    from thresher.data import read_documents

    if spec["format"] == "embedded":
        corpus = embedded_for(spec)
        return iter(corpus.pool if spec["role"] == "pool" else corpus.target)
    return read_documents(spec["path"], spec["text_field"], split=spec.get("split", "auto"),
                          format=spec["format"], hf_split=spec.get("hf_split"))
