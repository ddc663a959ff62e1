"""The embedded corpus: deterministic from the seed, labels aligned with the pool, held-out
target units, every corruption kind present and really corrupting."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from thresher.data import CORRUPTION_KINDS, embedded_corpus
from thresher.data.embedded import corrupt


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus(seed=0, size=200)


def test_deterministic_from_seed(corpus):
    again = embedded_corpus(seed=0, size=200)
    assert [d.text for d in again.pool] == [d.text for d in corpus.pool]
    assert [d.text for d in again.target] == [d.text for d in corpus.target]
    assert (again.labels == corpus.labels).all() and (again.kinds == corpus.kinds).all()
    other = embedded_corpus(seed=1, size=200)
    assert [d.text for d in other.pool] != [d.text for d in corpus.pool]


def test_sizes_labels_and_kinds(corpus):
    assert len(corpus.pool) == 200 and len(corpus.target) == 40
    assert [d.id for d in corpus.pool] == list(range(200))
    assert corpus.labels.dtype == bool and corpus.labels.shape == (200,)
    assert corpus.labels.sum() == 100  # corrupt_fraction 0.5
    assert (corpus.labels == (corpus.kinds != "")).all()
    counts = collections.Counter(corpus.kinds[corpus.labels].tolist())
    assert set(counts) == set(CORRUPTION_KINDS) and max(counts.values()) - min(counts.values()) <= 1
    for d, bad, kind in zip(corpus.pool, corpus.labels, corpus.kinds):
        assert d.meta["corrupted"] == bad and d.meta["kind"] == kind and len(d.text) > 0
    assert set(corpus.sources.tolist()) <= {"topic", "docstring", "code"}
    assert {d.meta["source"] for d in corpus.target} == {"topic", "docstring", "code"}


def test_target_is_held_out_and_clean(corpus):
    pool_units = {d.meta["unit"] for d in corpus.pool}
    target_units = {d.meta["unit"] for d in corpus.target}
    assert not pool_units & target_units
    pool_texts = {d.text for d in corpus.pool}
    assert not any(d.text in pool_texts for d in corpus.target)
    assert all("kind" not in d.meta for d in corpus.target)


def _printable_ascii_share(text):
    return np.mean([32 <= ord(c) < 127 or c == "\n" for c in text])


def test_corruptions_change_the_text(corpus):
    clean = [d.text for d, bad in zip(corpus.pool, corpus.labels) if not bad]
    for d, kind in zip(corpus.pool, corpus.kinds):
        if kind == "random_bytes":
            assert _printable_ascii_share(d.text) < 0.6  # mostly Latin-1 beyond ASCII
            assert not any(0x7F <= ord(c) < 0xA0 or (ord(c) < 32 and c != "\n") for c in d.text)
        elif kind == "repeated":
            lines = d.text.split("\n")
            assert len(set(lines)) <= 3 and len(lines) >= len(set(lines))
        elif kind == "boilerplate":
            assert any(w in d.text for w in ("cookies", "Privacy", "Subscribe", "Share", "Sign in", "cart",
                                             "Home |", "Page", "Loading", "Sponsored", "Skip", "Related", "reCAPTCHA"))
        elif kind == "shuffled":
            assert all(len(line.split()) <= 12 for line in d.text.split("\n"))
    assert np.mean([_printable_ascii_share(t) for t in clean]) > 0.95


def test_document_lengths_and_bad_args(corpus):
    # (the named sizes, 1,500 and 5,000 pool documents, are built by the demo; too slow here)
    chars = np.array([len(d.text) for d in corpus.pool + corpus.target])
    assert chars.min() >= 100 and chars.max() <= 2000
    with pytest.raises(ValueError, match="size"):
        embedded_corpus(size="huge")
    with pytest.raises(ValueError, match="size must be >= 10"):
        embedded_corpus(size=3)
    with pytest.raises(TypeError, match="size must be an int"):  # core's check_int
        embedded_corpus(size=50.0)
    with pytest.raises(ValueError, match=r"corrupt_fraction must be in \[0.0, 1.0\)"):
        embedded_corpus(size=50, corrupt_fraction=1.0)
    with pytest.raises(TypeError, match="corrupt_fraction must be a number"):
        embedded_corpus(size=50, corrupt_fraction="0.5")
    with pytest.raises(TypeError, match="seed"):
        embedded_corpus(seed="0", size=50)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        embedded_corpus(seed=-1, size=50)
    with pytest.raises(ValueError, match="kind must be one of"):
        corrupt("text", "reversed", np.random.default_rng(0))


def test_write(tmp_path, corpus):
    from thresher.data import read_documents

    pool_path, target_path = corpus.write(tmp_path)
    back = list(read_documents(pool_path))
    assert [d.text for d in back] == [d.text for d in corpus.pool]
    assert [d.meta["corrupted"] for d in back] == corpus.labels.tolist()
    assert len(list(read_documents(target_path))) == len(corpus.target)
