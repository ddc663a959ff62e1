"""Packing documents into fixed-length samples with an exact sample -> (document, offset) map.

No packing across documents: a document's tokens plus one ``eos`` are cut into chunks of
``seq_len`` tokens; the last chunk is padded with ``pad_id`` and its pad positions get label
-100. A sample therefore belongs to exactly one document, and a score given to a sample is a
score of (part of) that document. A tail chunk with fewer than ``min_tokens`` tokens (default
2: one token has nothing to predict once the model shifts) is dropped, so every sample has
at least one target; a document whose tokens + eos are shorter than that (an empty text) gets
no sample and a NaN document score.

Memory: ``input_ids`` and ``labels`` are int64, 16 bytes per token slot, e.g. 160 MB for
10 M slots (80k samples of 128). ``save`` stores them as int32 (vocabularies < 2**31).
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .atomic import save_json, save_npy
from .documents import Document

__all__ = ["Samples", "pack"]

_REDUCTIONS = ("mean", "token_mean", "max", "min", "sum")
_FORMAT_VERSION = 1


class Samples:
    """Fixed-length samples of a corpus.

    ``input_ids``/``labels``: LongTensor (N, seq_len), labels = input_ids with pad positions
    -100; ``doc_index``/``offset``: int64 (N,) -- the document id each sample comes from and
    the token offset of its first token in that document; ``lengths``: int64 (N,) real
    (non-pad) tokens; ``n_docs``: number of documents of the source, including any without a
    sample (so ``doc_scores`` arrays are aligned with document ids)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_index, offset,
                 lengths=None, n_docs: int | None = None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be a tensor of shape {tuple(input_ids.shape)}")
        n = input_ids.shape[0]
        self.input_ids = input_ids.long()
        self.labels = labels.long()
        self.doc_index = np.asarray(doc_index, dtype=np.int64).reshape(-1)
        self.offset = np.asarray(offset, dtype=np.int64).reshape(-1)
        if lengths is None:
            lengths = (self.labels != -100).sum(dim=1).numpy()
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
        (weighted by real tokens), "max", "min", "sum"."""
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
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
        save_npy(p / "input_ids.npy", self.input_ids.numpy().astype(np.int32))
        save_npy(p / "labels.npy", self.labels.numpy().astype(np.int32))
        save_npy(p / "doc_index.npy", self.doc_index)
        save_npy(p / "offset.npy", self.offset)
        save_npy(p / "lengths.npy", self.lengths)
        save_json(p / "samples.json", {"format_version": _FORMAT_VERSION, "n_samples": len(self),
                                       "seq_len": self.seq_len, "n_docs": self.n_docs})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Samples":
        p = Path(path)
        if not (p / "samples.json").is_file():
            raise FileNotFoundError(f"{str(p)!r} holds no saved Samples (no samples.json)")
        info = json.loads((p / "samples.json").read_text())
        ids = torch.from_numpy(np.load(p / "input_ids.npy").astype(np.int64))
        labels = torch.from_numpy(np.load(p / "labels.npy").astype(np.int64))
        return cls(ids, labels, np.load(p / "doc_index.npy"), np.load(p / "offset.npy"),
                   np.load(p / "lengths.npy"), info["n_docs"])


def reduce_by_document(s: np.ndarray, doc_index: np.ndarray, n_docs: int, reduce: str,
                       lengths: np.ndarray | None = None) -> np.ndarray:
    """Scatter-reduce per-sample values ``s`` to documents (NaN where a document has none)."""
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


def pack(docs: Iterable[Document | str], tokenizer, seq_len: int, *, batch_size: int = 512,
         min_tokens: int = 2, progress: bool = False, desc: str = "tokenise+pack") -> Samples:
    """Tokenise ``docs`` (in batches of ``batch_size`` documents) and cut them into samples.
    A document's id is its ``Document.id`` (strings: their position); ids must increase."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(min_tokens, int) or not 1 <= min_tokens <= seq_len:
        raise ValueError(f"min_tokens must be an integer in [1, seq_len], got {min_tokens!r}")
    L, eos, pad = seq_len, tokenizer.eos_id, tokenizer.pad_id
    rows, labs, dix, offs, lens = [], [], [], [], []
    n_docs, last_id = 0, -1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit="doc")
    it = iter(docs)
    pos = 0
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
        short = tail < min_tokens
        chunks[short] -= 1
        n_eff = np.minimum(n, chunks * L)  # tokens kept: drops a too-short tail chunk
        flat = np.concatenate([np.append(t, eos) for t in toks]) if toks else np.empty(0, np.int64)
        doc_start = np.concatenate([[0], np.cumsum(n)[:-1]])
        keep_tok = np.arange(len(flat)) - np.repeat(doc_start, n) < np.repeat(n_eff, n)
        row_start = np.concatenate([[0], np.cumsum(chunks)[:-1]])
        p_in_doc = (np.arange(len(flat)) - np.repeat(doc_start, n))[keep_tok]
        which = np.repeat(np.arange(len(batch)), n)[keep_tok]
        R = int(chunks.sum())
        block = np.full((R, L), pad, dtype=np.int64)
        r = row_start[which] + p_in_doc // L
        block[r, p_in_doc % L] = flat[keep_tok]
        row_len = np.bincount(r, minlength=R).astype(np.int64)
        lab = block.copy()
        lab[np.arange(L)[None, :] >= row_len[:, None]] = -100
        rows.append(block)
        labs.append(lab)
        sample_doc = np.repeat(np.arange(len(batch)), chunks)
        dix.append(np.asarray(ids, dtype=np.int64)[sample_doc])
        offs.append((np.arange(R) - row_start[sample_doc]) * L)
        lens.append(row_len)
        n_docs = last_id + 1
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.empty(shape, np.int64))
    return Samples(torch.from_numpy(cat(rows, (0, L))), torch.from_numpy(cat(labs, (0, L))),
                   cat(dix, (0,)), cat(offs, (0,)), cat(lens, (0,)), n_docs)
