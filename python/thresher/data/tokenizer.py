"""Tokenisers, all offline: ``"byte"`` (UTF-8 bytes), ``"bpe"`` (a byte-level BPE trained on
the pool and cached under a hash of its text) or a path to a local HF tokenizer.
:func:`load_tokenizer` returns a :class:`Tokenizer`. The special tokens, the training cap,
the cache and the long-run cut: docs/data.md §2.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from thresher.core.checks import check_int
from thresher.core.files import atomic_tmp_path, commit

__all__ = ["Tokenizer", "load_tokenizer", "default_cache_dir", "MAX_RUN_CHARS"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")
_BPE_RECIPE = "bytelevel-bpe-v2"  # v2: long runs pre-split at MAX_RUN_CHARS
MAX_RUN_CHARS = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get("THRESHER_CACHE") or Path.home() / ".cache" / "thresher")


class Tokenizer:
    """``encode``/``encode_batch``/``decode`` with ``vocab_size``, ``eos_id``, ``pad_id``.

    ``spec`` says how to get the same tokenizer again (recorded in manifests); ``path`` is
    the tokenizer file when there is one. Special tokens in the text are not parsed as
    specials (``add_special_tokens=False``); ``pack`` appends ``eos_id`` itself."""

    def __init__(self, *, kind: str, spec: str, vocab_size: int, eos_id: int, pad_id: int,
                 backend=None, path: str | None = None, from_cache: bool = False):
        self.kind, self.spec, self.vocab_size = kind, spec, int(vocab_size)
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.path, self.from_cache = path, from_cache
        self._backend = backend  # tokenizers.Tokenizer, transformers tokenizer or None (bytes)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, spec={self.spec!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "byte":
            return [list(t.encode("utf-8")) for t in texts]
        if self.kind == "transformers":
            return self._backend(list(texts), add_special_tokens=False)["input_ids"]
        # Rust, parallel over the batch; *_fast skips the offset bookkeeping
        enc = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like ``encode_batch`` but int64 arrays (the byte path skips Python int lists)."""
        if self.kind == "byte":
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self._backend.decode(ids, skip_special_tokens=True)


def _byte_tokenizer() -> Tokenizer:
    return Tokenizer(kind="byte", spec="byte", vocab_size=258, eos_id=256, pad_id=257)


def load_tokenizer(
    spec: str | os.PathLike | None = None,
    train_docs=None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    *,
    max_train_chars: int = 20_000_000,
) -> Tokenizer:
    """The tokenizer ``spec`` names: ``"byte"``; ``None``/``"bpe"``, a BPE of ``vocab_size``
    trained on at most ``max_train_chars`` characters of ``train_docs`` (documents or strings,
    any iterable; only read for ``"bpe"``) and cached in ``cache_dir``; or a path to a local
    HF tokenizer (docs/data.md §2)."""
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be None, 'bpe', 'byte' or a path, got {type(spec).__name__}")
    if spec == "byte":
        return _byte_tokenizer()
    if spec is None or spec == "bpe":
        if train_docs is None:
            raise ValueError("tokenizer 'bpe' is trained on the pool: pass train_docs")
        return _train_bpe(train_docs, vocab_size, cache_dir, max_train_chars)
    p = Path(spec)
    if not p.exists():
        raise ValueError(
            f"tokenizer must be 'bpe', 'byte' or a path to a local HF tokenizer "
            f"(tokenizer.json or a folder), got {str(spec)!r}: no such file or folder"
        )
    return _load_path(p)


def _train_bpe(train_docs, vocab_size: int, cache_dir, max_train_chars: int) -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    vocab_size = check_int("vocab_size", vocab_size, 258 + 2)
    max_train_chars = check_int("max_train_chars", max_train_chars, 1)
    texts, total = [], 0
    h = hashlib.sha256(f"{_BPE_RECIPE}|{vocab_size}|{tokenizers.__version__}|".encode())
    for d in train_docs:
        t = d if isinstance(d, str) else d.text
        t = t[: max_train_chars - total]
        texts.append(t)
        b = t.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        total += len(t)
        if total >= max_train_chars:
            break
    if total == 0:
        raise ValueError("train_docs hold no text: the pool is empty (or every document is), so "
                         "there is nothing to train the BPE tokenizer on")
    digest = h.hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tokenizers" / f"bpe-{vocab_size}-{digest}.json"
    spec = f"bpe:{vocab_size}:{digest}"
    if path.is_file():
        tok = tokenizers.Tokenizer.from_file(str(path))
        return _wrap_bpe(tok, spec, path, from_cache=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(rf"\S{{{MAX_RUN_CHARS}}}|\s{{{MAX_RUN_CHARS}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tmp = atomic_tmp_path(path)
    tok.save(str(tmp))
    commit(tmp, path)
    return _wrap_bpe(tok, spec, path, from_cache=False)


def _wrap_bpe(tok, spec: str, path: Path, from_cache: bool) -> Tokenizer:
    return Tokenizer(kind="bpe", spec=spec, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                     eos_id=tok.token_to_id(EOS_TOKEN), pad_id=tok.token_to_id(PAD_TOKEN),
                     backend=tok, path=str(path), from_cache=from_cache)


def _config_token(folder: Path, key: str) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    value = json.loads(cfg.read_text(encoding="utf-8")).get(key)
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tok_to_id, preferred: str | None, names: Sequence[str]) -> int | None:
    for name in ((preferred,) if preferred else ()) + tuple(names):
        i = tok_to_id(name)
        if i is not None:
            return i
    return None


def _load_path(p: Path) -> Tokenizer:
    import tokenizers

    file = p if p.is_file() else p / "tokenizer.json"
    folder = p.parent if p.is_file() else p
    if file.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"tokenizer {str(file)!r} is not a HF tokenizers file: {e}") from None
        eos = _special_id(tok.token_to_id, _config_token(folder, "eos_token"), _EOS_NAMES)
        if eos is None:  # no end-of-text token: add one (ids of existing tokens unchanged)
            tok.add_special_tokens([EOS_TOKEN])
            eos = tok.token_to_id(EOS_TOKEN)
        pad = _special_id(tok.token_to_id, _config_token(folder, "pad_token"), _PAD_NAMES)
        return Tokenizer(kind="hf", spec=str(p.resolve()), vocab_size=tok.get_vocab_size(with_added_tokens=True),
                         eos_id=eos, pad_id=eos if pad is None else pad, backend=tok, path=str(file))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ValueError(f"tokenizer folder {str(p)!r} has no tokenizer.json and transformers "
                         f"cannot load it offline: {e}") from None
    if getattr(tok, "is_fast", False):  # use the Rust tokenizer directly (batched, parallel)
        backend = tok.backend_tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else _special_id(backend.token_to_id, None, _EOS_NAMES)
        if eos is None:
            raise ValueError(f"tokenizer {str(p)!r} has no end-of-text token")
        pad = tok.pad_token_id
        return Tokenizer(kind="hf", spec=str(p.resolve()), vocab_size=len(tok), eos_id=eos,
                         pad_id=eos if pad is None else pad, backend=backend, path=str(p))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {str(p)!r} has no end-of-text token")
    pad = tok.pad_token_id
    return Tokenizer(kind="transformers", spec=str(p.resolve()), vocab_size=len(tok), eos_id=tok.eos_token_id,
                     pad_id=tok.eos_token_id if pad is None else pad, backend=tok, path=str(p))
