"""Packing documents into fixed-length samples (:class:`Samples`) with an exact
sample -> (document, offset) map: no packing across documents, so a sample's score is a
score of its document, and :meth:`Samples.doc_scores` / :func:`reduce_by_document` reduce
sample scores to document scores. ``pack(..., out=DIR)`` writes to disk as it goes, for
pools larger than memory. The rules (padding, dropped tails, ids), the reductions and the
memory: docs/data.md §3.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from thresher.core.checks import check_choice, check_int, check_optional_int, check_tensor
from thresher.core.constants import DOCUMENT_REDUCTIONS, IGNORE_INDEX
from thresher.core.files import save_json, save_npy

from .documents import Document

__all__ = ["Samples", "pack", "reduce_by_document"]

_FORMAT_VERSION = 1
_ARRAYS = ("input_ids", "labels", "doc_index", "offset", "lengths")  # all int64 .npy


def _save_info(p: Path, n: int, seq_len: int, n_docs: int) -> None:
    # written last: a folder with samples.json is complete
    save_json(p / "samples.json", {"format_version": _FORMAT_VERSION, "n_samples": n,
                                   "seq_len": seq_len, "n_docs": n_docs})


class Samples:
    """Fixed-length samples of a corpus.

    ``input_ids``/``labels``: LongTensor (N, seq_len), labels = input_ids with pad positions
    -100; ``doc_index``/``offset``: int64 (N,) -- the document id each sample comes from and
    the token offset of its first token in that document; ``lengths``: int64 (N,) real
    (non-pad) tokens; ``n_docs``: number of documents of the source, including any without a
    sample (so ``doc_scores`` arrays are aligned with document ids)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_index, offset,
                 lengths=None, n_docs: int | None = None):
        check_tensor("input_ids", input_ids, ndim=2)
        check_tensor("labels", labels, shape=tuple(input_ids.shape))
        n_docs = check_optional_int("n_docs", n_docs, 0)
        n = input_ids.shape[0]
        self.input_ids = input_ids.long()  # no copy when already int64 (e.g. memory-mapped)
        self.labels = labels.long()
        self.doc_index = np.asarray(doc_index, dtype=np.int64).reshape(-1)
        self.offset = np.asarray(offset, dtype=np.int64).reshape(-1)
        if lengths is None:
            lengths = (self.labels != IGNORE_INDEX).sum(dim=1).numpy()
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        for name, a in (("doc_index", self.doc_index), ("offset", self.offset), ("lengths", self.lengths)):
            if a.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
        if n_docs is None:
            n_docs = int(self.doc_index.max()) + 1 if n else 0
        if n and int(self.doc_index.max()) >= n_docs:
            raise ValueError(f"n_docs ({n_docs}) must exceed every doc_index (max {int(self.doc_index.max())})")
        self.n_docs = int(n_docs)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __repr__(self) -> str:
        return (f"Samples(n={len(self)}, seq_len={self.seq_len}, n_docs={self.n_docs}, "
                f"tokens={self.num_tokens})")

    def __getitem__(self, idx) -> "Samples":
        """A subset (an int keeps the batch dimension); doc ids keep referring to the source."""
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype == bool:
                if idx.shape != (len(self),):
                    raise ValueError(f"a boolean index must have shape ({len(self)},), got {idx.shape}")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64)
            t_idx = torch.from_numpy(idx)
        else:
            t_idx = idx
        return Samples(self.input_ids[t_idx], self.labels[t_idx], self.doc_index[idx],
                       self.offset[idx], self.lengths[idx], self.n_docs)

    def doc_scores(self, scores, reduce: str = "mean") -> np.ndarray:
        """Per-document scores (float64, length ``n_docs``; NaN for a document without a
        sample) from per-sample scores. ``reduce``: "mean" (of its samples), "token_mean"
        (weighted by real tokens), "max", "min", "sum" (``DOCUMENT_REDUCTIONS``, checked by
        :func:`reduce_by_document`)."""
        s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
        if s.shape != (len(self),):
            raise ValueError(f"scores must have shape ({len(self)},) (one per sample), got {s.shape}")
        if np.isnan(s).any():
            raise ValueError(f"scores contain NaN (first at sample {int(np.flatnonzero(np.isnan(s))[0])})")
        return reduce_by_document(s, self.doc_index, self.n_docs, reduce, self.lengths)

    def save(self, path: str | os.PathLike) -> None:
        """Numpy files in folder ``path`` (each written atomically; ``samples.json`` last,
        so a folder with it is complete)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            a = getattr(self, name)
            save_npy(p / f"{name}.npy", a.numpy() if isinstance(a, torch.Tensor) else a)
        _save_info(p, len(self), self.seq_len, self.n_docs)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> "Samples":
        """``mmap=True``: memory-map the files (copy-on-write: writes never reach the disk)."""
        p = Path(path)
        if not (p / "samples.json").is_file():
            raise FileNotFoundError(f"{str(p)!r} holds no saved Samples (no samples.json)")
        info = json.loads((p / "samples.json").read_text())
        a = {name: np.load(p / f"{name}.npy", mmap_mode="c" if mmap else None) for name in _ARRAYS}
        # int64 on disk, so the tensors can share the mapped pages (no conversion copy)
        return cls(torch.from_numpy(a["input_ids"]), torch.from_numpy(a["labels"]), a["doc_index"],
                   a["offset"], a["lengths"], info["n_docs"])


def reduce_by_document(s: np.ndarray, doc_index: np.ndarray, n_docs: int, reduce: str,
                       lengths: np.ndarray | None = None) -> np.ndarray:
    """Scatter-reduce per-sample values ``s`` to documents (NaN where a document has none);
    ``reduce`` is one of ``DOCUMENT_REDUCTIONS``."""
    check_choice("reduce", reduce, DOCUMENT_REDUCTIONS)
    count = np.bincount(doc_index, minlength=n_docs)
    out = np.full(n_docs, np.nan)
    has = count > 0
    if reduce in ("mean", "sum"):
        total = np.bincount(doc_index, weights=s, minlength=n_docs)
        out[has] = total[has] / count[has] if reduce == "mean" else total[has]
    elif reduce == "token_mean":
        w = np.asarray(lengths, dtype=np.float64)
        tw = np.bincount(doc_index, weights=w, minlength=n_docs)
        total = np.bincount(doc_index, weights=s * w, minlength=n_docs)
        out[has] = total[has] / tw[has]
    else:
        fill = -np.inf if reduce == "max" else np.inf
        acc = np.full(n_docs, fill)
        (np.maximum if reduce == "max" else np.minimum).at(acc, doc_index, s)
        out[has] = acc[has]
    return out


class _MemorySink:
    def __init__(self):
        self.parts = {name: [] for name in _ARRAYS}

    def add(self, **arrays):
        for k, v in arrays.items():
            self.parts[k].append(v)

    def finish(self, L: int, n_docs: int) -> Samples:
        a = {k: np.concatenate(v) if v else np.empty((0, L) if k in ("input_ids", "labels") else (0,), np.int64)
             for k, v in self.parts.items()}
        return Samples(torch.from_numpy(a["input_ids"]), torch.from_numpy(a["labels"]), a["doc_index"],
                       a["offset"], a["lengths"], n_docs)


class _DiskSink:
    """Appends each batch to raw files in ``out``, then writes the .npy files (header +
    a chunked copy, since the row count is known only at the end) and memory-maps them."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "samples.json").unlink(missing_ok=True)  # incomplete until finish()
        self.files = {k: open(self.out / f".{k}.raw", "wb") for k in _ARRAYS}
        self.n = 0

    def add(self, **arrays):
        for k, v in arrays.items():
            np.ascontiguousarray(v, dtype=np.int64).tofile(self.files[k])
        self.n += len(arrays["doc_index"])

    def finish(self, L: int, n_docs: int) -> Samples:
        from numpy.lib.format import open_memmap

        from thresher.core.files import atomic_tmp_path, commit

        rows = 1 << 14  # copy 16k samples at a time: bounded memory
        for k, f in self.files.items():
            f.close()
            raw_path = self.out / f".{k}.raw"
            shape = (self.n, L) if k in ("input_ids", "labels") else (self.n,)
            tmp = atomic_tmp_path(self.out / f"{k}.npy")
            dst = open_memmap(tmp, mode="w+", dtype=np.int64, shape=shape)
            if self.n:
                src = np.memmap(raw_path, dtype=np.int64, mode="r", shape=shape)
                for i in range(0, self.n, rows):
                    dst[i:i + rows] = src[i:i + rows]
                del src
            dst.flush()
            del dst
            commit(tmp, self.out / f"{k}.npy")
            raw_path.unlink()
        _save_info(self.out, self.n, L, n_docs)
        return Samples.load(self.out, mmap=True)

    def abort(self):
        for k, f in self.files.items():
            f.close()
            (self.out / f".{k}.raw").unlink(missing_ok=True)


def pack(docs: Iterable[Document | str], tokenizer, seq_len: int, *, batch_size: int = 512,
         min_tokens: int = 2, out: str | os.PathLike | None = None, progress: bool = False,
         desc: str = "tokenise+pack") -> Samples:
    """Tokenise ``docs`` (in batches of ``batch_size`` documents) and cut them into samples.
    A document's id is its ``Document.id`` (strings: their position); ids must increase.
    ``out``: write the samples to that folder as they are made and return them
    memory-mapped (for pools larger than memory; the folder is what ``Samples.save`` writes)."""
    seq_len = check_int("seq_len", seq_len, 2)
    if check_int("min_tokens", min_tokens, 1) > seq_len:
        raise ValueError(f"min_tokens must be <= seq_len ({seq_len}), got {min_tokens}")
    batch_size = check_int("batch_size", batch_size, 1)
    sink = _DiskSink(out) if out is not None else _MemorySink()
    try:
        n_docs = _pack_into(sink, docs, tokenizer, seq_len, batch_size, min_tokens, progress, desc)
    except BaseException:
        if isinstance(sink, _DiskSink):
            sink.abort()
        raise
    return sink.finish(seq_len, n_docs)


def _pack_into(sink, docs, tokenizer, L, batch_size, min_tokens, progress, desc) -> int:
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    n_docs, last_id, pos = 0, -1, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit="doc")
    it = iter(docs)
    while True:
        batch = list(itertools.islice(it, batch_size))
        if not batch:
            break
        ids = []
        for j, d in enumerate(batch):
            i = pos + j if isinstance(d, str) else int(d.id)
            if i <= last_id:
                raise ValueError(f"document ids must increase (got {i} after {last_id})")
            last_id = i
            ids.append(i)
        pos += len(batch)
        toks = tokenizer.encode_batch_arrays([d if isinstance(d, str) else d.text for d in batch])
        n = np.array([len(t) + 1 for t in toks], dtype=np.int64)  # + eos
        chunks = -(-n // L)
        tail = n - (chunks - 1) * L
        chunks[tail < min_tokens] -= 1  # a too-short tail chunk is dropped
        n_eff = np.minimum(n, chunks * L)  # tokens kept per document
        flat = np.concatenate([np.append(t, eos) for t in toks])
        doc_of_tok = np.repeat(np.arange(len(batch)), n)
        pos_in_doc = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)
        keep = pos_in_doc < n_eff[doc_of_tok]
        pos_in_doc, doc_of_tok = pos_in_doc[keep], doc_of_tok[keep]
        row_start = np.cumsum(chunks) - chunks
        R = int(chunks.sum())
        block = np.full((R, L), pad, dtype=np.int64)
        r = row_start[doc_of_tok] + pos_in_doc // L
        block[r, pos_in_doc % L] = flat[keep]
        row_len = np.bincount(r, minlength=R).astype(np.int64)
        lab = block.copy()
        lab[np.arange(L)[None, :] >= row_len[:, None]] = IGNORE_INDEX
        sample_doc = np.repeat(np.arange(len(batch)), chunks)
        sink.add(input_ids=block, labels=lab, doc_index=np.asarray(ids, dtype=np.int64)[sample_doc],
                 offset=(np.arange(R) - row_start[sample_doc]) * L, lengths=row_len)
        n_docs = last_id + 1
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return n_docs
