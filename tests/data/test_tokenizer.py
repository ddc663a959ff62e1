"""Tokenisers: byte fallback, BPE trained on the pool and cached by content hash, local HF
tokenizer files and folders, errors."""
from __future__ import annotations

import json

import pytest

from thresher.data import Document, load_tokenizer

TRAIN = [f"def function_{i}(x):\n    return x * {i}  # the value of x times {i}\n" for i in range(300)]


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    text = "héllo ✓\n\x00"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids + [tok.eos_id]) == text
    assert [a.tolist() for a in tok.encode_batch_arrays(["ab", ""])] == [[97, 98], []]


def test_bpe_trains_once_and_is_cached_by_content(tmp_path):
    tok = load_tokenizer("bpe", TRAIN, vocab_size=300, cache_dir=tmp_path)
    assert not tok.from_cache and tok.vocab_size == 300 and {tok.eos_id, tok.pad_id} == {0, 1}
    for text in TRAIN[:5] + ["unseen ✓ text ÿ"]:  # byte level: any text round-trips
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(TRAIN[7])) < len(TRAIN[7].encode()) / 2  # merges learnt
    # the same text (as Documents this time) hits the cache; other text or size does not
    again = load_tokenizer(None, [Document(i, t) for i, t in enumerate(TRAIN)], vocab_size=300, cache_dir=tmp_path)
    assert again.from_cache and again.spec == tok.spec and again.encode(TRAIN[3]) == tok.encode(TRAIN[3])
    other = load_tokenizer("bpe", TRAIN[:-1], vocab_size=300, cache_dir=tmp_path)
    bigger = load_tokenizer("bpe", TRAIN, vocab_size=320, cache_dir=tmp_path)
    assert not other.from_cache and not bigger.from_cache and len({tok.spec, other.spec, bigger.spec}) == 3
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 3
    # the encode_batch path equals one-by-one encoding
    assert tok.encode_batch(TRAIN[:20]) == [tok.encode(t) for t in TRAIN[:20]]


def test_local_tokenizer_file_and_folder(tmp_path):
    bpe = load_tokenizer("bpe", TRAIN, vocab_size=280, cache_dir=tmp_path / "cache")
    by_file = load_tokenizer(bpe.path)
    assert (by_file.vocab_size, by_file.eos_id, by_file.pad_id) == (280, bpe.eos_id, bpe.pad_id)
    assert by_file.encode(TRAIN[1]) == bpe.encode(TRAIN[1])
    # a folder with tokenizer.json + tokenizer_config.json naming the specials
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(open(bpe.path).read())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
    by_dir = load_tokenizer(folder)
    assert by_dir.eos_id == bpe.pad_id and by_dir.kind == "hf"


def test_tokenizer_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "wl.json"))
    tok = load_tokenizer(tmp_path / "wl.json")
    assert tok.eos_id == 3 and tok.pad_id == 3 and tok.vocab_size == 4
    assert tok.encode("a b c") == [0, 1, 2]


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="'bpe', 'byte' or a path"):
        load_tokenizer("gpt2-not-a-path")
    with pytest.raises(ValueError, match="train_docs"):
        load_tokenizer("bpe")
    with pytest.raises(ValueError, match="no text"):
        load_tokenizer("bpe", ["", ""], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        load_tokenizer("bpe", TRAIN, vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="vocab_size must be an int"):  # core's check_int
        load_tokenizer("bpe", TRAIN, vocab_size=300.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_train_chars must be >= 1"):
        load_tokenizer("bpe", TRAIN, cache_dir=tmp_path, max_train_chars=0)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a HF tokenizers file"):
        load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(TypeError, match="tokenizer spec"):
        load_tokenizer(3)


def test_bpe_pre_splits_long_runs_and_round_trips(tmp_path):
    # a long run without whitespace is one GPT-2 pre-token, which makes BPE training and
    # encoding superlinear; it must be cut into pieces of at most MAX_RUN_CHARS characters
    import random

    from thresher.data.tokenizer import MAX_RUN_CHARS

    rng = random.Random(0)
    run = "".join(rng.choice("abcdefghij") for _ in range(20_000))
    spaces = " " * 5_000
    text = f"plain words here {run} and{spaces}more ünïcödé ✓{run[:999]}\n"
    tok = load_tokenizer("bpe", train_docs=[text, "hello world " * 50], vocab_size=300,
                         cache_dir=tmp_path)
    pieces = tok._backend.pre_tokenizer.pre_tokenize_str(text)
    assert max(len(p) for p, _ in pieces) <= MAX_RUN_CHARS
    # ordinary words are not affected: the GPT-2 split still decides them
    assert [p for p, _ in tok._backend.pre_tokenizer.pre_tokenize_str("plain words here")] == \
        ["plain", "Ġwords", "Ġhere"]
    for t in (text, run, spaces, "x" * (MAX_RUN_CHARS + 1), "é" * 3 * MAX_RUN_CHARS):
        assert tok.decode(tok.encode(t)) == t
