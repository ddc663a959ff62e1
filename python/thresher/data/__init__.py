"""thresher.data: corpus readers/writers, tokenisation, packing and the embedded default corpus.

* :func:`read_documents` / :func:`write_documents` / :func:`write_selected`: jsonl, parquet,
  a folder of text files, a single text file, HF datasets saved to disk (streaming).
* :func:`load_tokenizer`: a local HF tokenizer, a byte-level BPE trained on the pool
  (cached), or bytes.
* :func:`pack` -> :class:`Samples`: fixed-length samples, no packing across documents, an
  exact sample -> (document, offset) map.
* :func:`embedded_corpus`: the default corpus built from the running Python's docs and
  source plus labelled corrupted documents, with a held-out target split.

How each part works: docs/data.md.
"""
from thresher.core.lazy import lazy_exports

# public name -> the submodule that defines it (imported on first use: no torch at import)
_EXPORTS = {
    'FORMATS': 'documents',
    'Document': 'documents',
    'count_documents': 'documents',
    'detect_format': 'documents',
    'read_documents': 'documents',
    'resolve_split': 'documents',
    'write_documents': 'documents',
    'write_selected': 'documents',
    'CORRUPTION_KINDS': 'embedded',
    'EMBEDDED_SIZES': 'embedded',
    'Corpus': 'embedded',
    'embedded_corpus': 'embedded',
    'Samples': 'packing',
    'pack': 'packing',
    'Tokenizer': 'tokenizer',
    'load_tokenizer': 'tokenizer',
}

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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
