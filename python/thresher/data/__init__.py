"""thresher.data: corpus readers/writers, tokenisation, packing and the embedded default corpus.

* :func:`read_documents` / :func:`write_documents` / :func:`write_selected`: jsonl, parquet,
  a folder of text files, a single text file, HF datasets saved to disk (streaming).
* :func:`load_tokenizer`: a local HF tokenizer, a byte-level BPE trained on the pool
  (cached), or bytes.
* :func:`pack` -> :class:`Samples`: fixed-length samples, no packing across documents, an
  exact sample -> (document, offset) map.
* :func:`embedded_corpus`: the default corpus built from the running Python's docs and
  source plus labelled corrupted documents, with a held-out target split.
"""
from .documents import (
    FORMATS,
    Document,
    count_documents,
    detect_format,
    read_documents,
    resolve_split,
    write_documents,
    write_selected,
)
from .embedded import CORRUPTION_KINDS, EMBEDDED_SIZES, Corpus, embedded_corpus
from .packing import Samples, pack
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "FORMATS",
    "Document",
    "count_documents",
    "detect_format",
    "read_documents",
    "resolve_split",
    "write_documents",
    "write_selected",
    "CORRUPTION_KINDS",
    "EMBEDDED_SIZES",
    "Corpus",
    "embedded_corpus",
    "Samples",
    "pack",
    "Tokenizer",
    "load_tokenizer",
]
