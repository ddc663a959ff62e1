"""pack -> Samples: no packing across documents, exact sample -> (document, offset) map,
pads masked with -100, short tails dropped, save/load, indexing, doc_scores in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thresher.data import Document, Samples, load_tokenizer, pack
from thresher.data.packing import reduce_by_document


def _docs(seed=0, n=40):
    rng = np.random.default_rng(seed)
    lens = [0, 1, 6, 7, 8, 14, 15, 16] + list(rng.integers(0, 60, n - 8))
    # ids with gaps: the map must use Document.id, not the position
    return [Document(3 * i + 1, "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n_)))
            for i, n_ in enumerate(lens)]


@pytest.mark.parametrize("seq_len,min_tokens", [(8, 2), (8, 1), (5, 3), (64, 2)])
def test_pack_invariants(seq_len, min_tokens):
    tok = load_tokenizer("byte")
    docs = _docs()
    s = pack(docs, tok, seq_len, batch_size=7, min_tokens=min_tokens)
    assert s.input_ids.dtype == torch.long and s.input_ids.shape == (len(s), seq_len)
    assert s.n_docs == docs[-1].id + 1
    ids, labels = s.input_ids.numpy(), s.labels.numpy()
    pos = np.arange(seq_len)[None, :]
    real = pos < s.lengths[:, None]
    assert (labels[real] == ids[real]).all() and (labels[~real] == -100).all()
    assert (ids[~real] == tok.pad_id).all() and (s.lengths >= min_tokens).all()
    assert (np.diff(s.doc_index) >= 0).all()
    for d in docs:
        rows = np.flatnonzero(s.doc_index == d.id)
        full = tok.encode(d.text) + [tok.eos_id]
        n_chunks = -(-len(full) // seq_len)
        tail = len(full) - (n_chunks - 1) * seq_len
        expect = full if tail >= min_tokens else full[: (n_chunks - 1) * seq_len]
        assert len(rows) == -(-len(expect) // seq_len)
        assert s.offset[rows].tolist() == [seq_len * k for k in range(len(rows))]
        got = [t for r in rows for t in ids[r, : s.lengths[r]].tolist()]
        assert got == expect  # exact map back to the document's tokens
        for r in rows:  # the offset addresses the document's token stream
            assert ids[r, : s.lengths[r]].tolist() == full[s.offset[r]: s.offset[r] + s.lengths[r]]
    assert set(range(s.n_docs)) - set(s.doc_index.tolist()) >= {d for d in range(s.n_docs) if d % 3 != 1}


def test_empty_documents_get_no_sample_and_nan_score():
    tok = load_tokenizer("byte")
    s = pack(["", "abc", ""], tok, 4)
    assert s.doc_index.tolist() == [1] and s.n_docs == 3
    assert np.isnan(s.doc_scores([2.0])[[0, 2]]).all()
    empty = pack([], tok, 4)
    assert len(empty) == 0 and empty.n_docs == 0 and empty.input_ids.shape == (0, 4)


def test_bpe_pack_matches_single_encode(tmp_path):
    docs = [f"sample text number {i} " * (i % 9 + 1) for i in range(50)]
    tok = load_tokenizer("bpe", docs, vocab_size=300, cache_dir=tmp_path)
    s = pack(docs, tok, 16, batch_size=8)
    for i, text in enumerate(docs):
        rows = np.flatnonzero(s.doc_index == i)
        got = [t for r in rows for t in s.input_ids[r, : s.lengths[r]].tolist()]
        full = tok.encode(text) + [tok.eos_id]
        assert got == full[: len(got)] and len(full) - len(got) in (0, 1)
        assert tok.decode(got) == text


def test_indexing_save_load(tmp_path):
    s = pack(_docs(1), load_tokenizer("byte"), 8)
    sub = s[[5, 2, 9]]
    assert sub.doc_index.tolist() == s.doc_index[[5, 2, 9]].tolist() and sub.n_docs == s.n_docs
    assert torch.equal(sub.input_ids[1], s.input_ids[2])
    assert len(s[3]) == 1 and len(s[2:6]) == 4 and len(s[torch.tensor([0, 1])]) == 2
    mask = np.zeros(len(s), bool)
    mask[::2] = True
    assert len(s[mask]) == mask.sum()
    with pytest.raises(ValueError, match="boolean index"):
        s[mask[:-1]]
    s.save(tmp_path / "samples")
    t = Samples.load(tmp_path / "samples")
    assert torch.equal(t.input_ids, s.input_ids) and torch.equal(t.labels, s.labels)
    assert (t.doc_index == s.doc_index).all() and (t.offset == s.offset).all() and t.n_docs == s.n_docs
    with pytest.raises(FileNotFoundError, match="no saved Samples"):
        Samples.load(tmp_path)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        Samples(s.input_ids.numpy(), s.labels, s.doc_index, s.offset)
    with pytest.raises(ValueError, match="labels must have shape"):
        Samples(s.input_ids, s.labels[:, :-1], s.doc_index, s.offset)
    with pytest.raises(TypeError, match="n_docs must be an int"):
        Samples(s.input_ids, s.labels, s.doc_index, s.offset, n_docs=float(s.n_docs))


def test_doc_scores_reductions_float64():
    s = pack(_docs(2), load_tokenizer("byte"), 8)
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(len(s)).astype(np.float32)
    for reduce in ("mean", "token_mean", "max", "min", "sum"):
        got = s.doc_scores(scores, reduce=reduce)
        assert got.dtype == np.float64 and got.shape == (s.n_docs,)
        for d in range(s.n_docs):
            rows = np.flatnonzero(s.doc_index == d)
            if len(rows) == 0:
                assert np.isnan(got[d])
                continue
            x, w = scores[rows].astype(np.float64), s.lengths[rows].astype(np.float64)
            want = {"mean": x.mean(), "token_mean": (x * w).sum() / w.sum(), "max": x.max(),
                    "min": x.min(), "sum": x.sum()}[reduce]
            assert got[d] == pytest.approx(want, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="reduce must be one of"):
        s.doc_scores(scores, reduce="median")
    with pytest.raises(ValueError, match="reduce must be one of"):  # (it used to reduce by min)
        reduce_by_document(scores, s.doc_index, s.n_docs, "median")
    with pytest.raises(ValueError, match="one per sample"):
        s.doc_scores(scores[:-1])
    bad = scores.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        s.doc_scores(bad)


def test_pack_bad_args():
    tok = load_tokenizer("byte")
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        pack(["a"], tok, 1)
    with pytest.raises(TypeError, match="seq_len must be an int"):  # core's check_int
        pack(["a"], tok, 8.0)
    with pytest.raises(ValueError, match=r"min_tokens must be <= seq_len \(4\)"):
        pack(["a"], tok, 4, min_tokens=5)
    with pytest.raises(ValueError, match="min_tokens must be >= 1"):
        pack(["a"], tok, 4, min_tokens=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):  # (0 used to pack nothing)
        pack(["a"], tok, 4, batch_size=0)
    with pytest.raises(ValueError, match="ids must increase"):
        pack([Document(2, "a"), Document(1, "b")], tok, 4)


def test_pack_to_disk_equals_memory_and_is_memory_mapped(tmp_path):
    tok = load_tokenizer("byte")
    docs = _docs(3, n=60)
    mem = pack(docs, tok, 8, batch_size=16)
    disk = pack(iter(docs), tok, 8, batch_size=16, out=tmp_path / "s")  # any iterator: one pass
    assert isinstance(np.load(tmp_path / "s" / "input_ids.npy", mmap_mode="r"), np.memmap)
    for name in ("input_ids", "labels"):
        assert torch.equal(getattr(disk, name), getattr(mem, name))
    for name in ("doc_index", "offset", "lengths"):
        assert np.array_equal(getattr(disk, name), getattr(mem, name))
    assert disk.n_docs == mem.n_docs and not list((tmp_path / "s").glob(".*.raw"))
    sub = disk[np.array([3, 1])]  # indexing a mapped Samples gives an in-memory subset
    assert torch.equal(sub.input_ids, mem.input_ids[[3, 1]])
    loaded = Samples.load(tmp_path / "s", mmap=True)
    loaded.input_ids[0, 0] = 7  # copy-on-write: the file is untouched
    assert Samples.load(tmp_path / "s").input_ids[0, 0] == mem.input_ids[0, 0]
    empty = pack([], tok, 8, out=tmp_path / "e")
    assert len(empty) == 0 and empty.input_ids.shape == (0, 8)
    # an error while packing leaves no complete-looking folder behind
    with pytest.raises(ValueError, match="ids must increase"):
        pack([Document(1, "a"), Document(0, "b")], tok, 8, out=tmp_path / "bad")
    assert not (tmp_path / "bad" / "samples.json").exists() and not list((tmp_path / "bad").glob(".*.raw"))
