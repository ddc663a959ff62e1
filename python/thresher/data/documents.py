"""Corpus readers and writers: jsonl, parquet, a folder of text files, a single text file
(cut into documents by a ``split`` rule) and HF ``datasets`` saved to disk.

Every reader streams, and a document's id is its position in the read order, so a selection
(a set of ids) is written by reading the source again (:func:`write_selected`). Writers keep
the source's details (schema, features, files, split rule), write atomically and refuse to
overwrite a non-empty folder unless asked. The formats, the split rules and what is kept:
docs/data.md §1.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from thresher.core.checks import check_choice, check_optional_int
from thresher.core.files import atomic_open, atomic_tmp_path, commit

__all__ = [
    "Document",
    "FORMATS",
    "detect_format",
    "resolve_split",
    "read_documents",
    "write_documents",
    "write_selected",
    "count_documents",
    "output_is_folder",
]

FORMATS = ("jsonl", "parquet", "txt", "folder", "hf")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
DEFAULT_PARAGRAPH_CHARS = 1000
AUTO_SCAN_LINES = 10_000
# WikiText level-1 heading: " = Title = " -- one '=' on each side, title not starting/ending in '='
_WIKI_HEADING = re.compile(r"^ = [^=](?:.*[^=])? = $")


@dataclass
class Document:
    """One document: ``id`` is its position in the source's read order."""

    id: int
    text: str
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# format detection


def _is_hf_dir(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (
        p / "state.json"
    ).is_file()


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing corpus path (one of :data:`FORMATS`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path does not exist: {str(path)!r}")
    if p.is_dir():
        return "hf" if _is_hf_dir(p) else "folder"
    return _format_from_suffix(p, "path")


def _format_from_suffix(p: Path, name: str) -> str:
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "txt"
    raise ValueError(
        f"{name} {str(p)!r}: unknown file type {suffix or '(no suffix)'!r}; expected one of "
        f"{', '.join(JSONL_SUFFIXES + ('.parquet',) + TEXT_SUFFIXES)}, a folder of text files "
        "or a HF dataset saved with save_to_disk"
    )


def _parse_split(split: str) -> tuple[str, int]:
    """'wikitext' | 'paragraph[:N]' | 'lines:N' | 'file' -> (mode, N)."""
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, got {type(split).__name__}")
    mode, _, num = split.partition(":")
    if mode in ("wikitext", "file") and not num:
        return mode, 0
    if mode == "paragraph":
        n = DEFAULT_PARAGRAPH_CHARS if not num else _positive_int(num, split, allow_zero=True)
        return mode, n
    if mode == "lines" and num:
        return mode, _positive_int(num, split)
    raise ValueError(
        "split must be 'auto', 'wikitext', 'paragraph', 'paragraph:MIN_CHARS', 'lines:N' or "
        f"'file', got {split!r}"
    )


def _positive_int(s: str, split: str, allow_zero: bool = False) -> int:
    try:
        n = int(s)
    except ValueError:
        n = -1
    if n < (0 if allow_zero else 1):
        raise ValueError(f"split {split!r}: the number after ':' must be a positive integer")
    return n


def resolve_split(path: str | os.PathLike, split: str = "auto") -> str:
    """The concrete split rule for a text file: 'auto' looks for a WikiText level-1 heading
    in the first ``AUTO_SCAN_LINES`` lines (an article file has one near the top; a huge
    file is not read twice)."""
    if split != "auto":
        mode, n = _parse_split(split)
        return mode if mode in ("wikitext", "file") else f"{mode}:{n}"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in itertools.islice(f, AUTO_SCAN_LINES):
            if _WIKI_HEADING.match(line.rstrip("\n")):
                return "wikitext"
    return f"paragraph:{DEFAULT_PARAGRAPH_CHARS}"


def _separator(split: str) -> str:
    return "\n\n" if _parse_split(split)[0] == "paragraph" else "\n"


# ----------------------------------------------------------------------------------------
# readers


def read_documents(
    path: str | os.PathLike,
    text_field: str = "text",
    *,
    split: str = "auto",
    format: str | None = None,
    hf_split: str | None = None,
) -> Iterator[Document]:
    """Stream the documents of ``path``.

    ``text_field`` names the text field (jsonl), column (parquet, hf); ``split`` the rule
    that cuts a single text file into documents (docs/data.md §1); ``hf_split`` picks a
    split of a saved ``DatasetDict``. The path, format and field are checked before the
    first document is read, so errors surface at the call."""
    p = Path(path)
    fmt = format or detect_format(p)
    check_choice("format", fmt, FORMATS)
    if not p.exists():
        raise FileNotFoundError(f"corpus path does not exist: {str(path)!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if fmt == "jsonl":
        return _read_jsonl(p, text_field)
    if fmt == "parquet":
        return _read_parquet(p, text_field)
    if fmt == "txt":
        return _read_txt(p, resolve_split(p, split))
    if fmt == "folder":
        return _read_folder(p)
    return _read_hf(p, text_field, hf_split)


def count_documents(path, text_field: str = "text", **kwargs) -> int:
    """Number of documents (one streaming pass)."""
    return sum(1 for _ in read_documents(path, text_field, **kwargs))


def _read_jsonl(p: Path, text_field: str) -> Iterator[Document]:
    i = 0
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line: "
                                 f"{raw[e.start:e.start + 1]!r}); a jsonl file must be UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if text_field not in rec:
                raise ValueError(
                    f"{p}:{lineno}: no field {text_field!r} (fields: {', '.join(map(repr, rec))}); "
                    "choose the text field with text_field= / --text-field"
                )
            text = rec.pop(text_field)
            if not isinstance(text, str):
                raise ValueError(
                    f"{p}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}"
                )
            yield Document(i, text, rec)
            i += 1


def _read_parquet(p: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(p)  # reads the footer only
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(
            f"{p}: no column {text_field!r} (columns: {', '.join(map(repr, names))}); "
            "choose the text column with text_field= / --text-field"
        )

    def gen():
        i = 0
        # one row group at a time: memory is one row group, whatever the file size
        for rg in range(pf.num_row_groups):
            for rec in pf.read_row_group(rg).to_pylist():
                text = rec.pop(text_field)
                if not isinstance(text, str):
                    raise ValueError(
                        f"{p}: row {i}: column {text_field!r} must be a string, got "
                        f"{type(text).__name__}"
                    )
                yield Document(i, text, rec)
                i += 1

    return gen()


def _read_txt(p: Path, split: str) -> Iterator[Document]:
    mode, n = _parse_split(split)
    with open(p, encoding="utf-8", errors="replace") as f:
        chunks = _split_lines(f, mode, n)
        for i, text in enumerate(chunks):
            yield Document(i, text, {})


def _join(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def _split_lines(lines: Iterable[str], mode: str, n: int) -> Iterator[str]:
    """Cut a stream of lines (with their '\\n') into document texts."""
    if mode == "file":
        text = _join(list(lines))
        if text.strip():
            yield text
        return
    if mode == "lines":
        while True:
            chunk = list(itertools.islice(lines, n))
            if not chunk:
                return
            yield _join(chunk)
        return
    if mode == "wikitext":
        buf: list[str] = []
        for line in lines:
            if _WIKI_HEADING.match(line.rstrip("\n")) and buf:
                if "".join(buf).strip():  # blank preamble before the first heading: dropped
                    yield _join(buf)
                buf = []
            buf.append(line)
        if buf and "".join(buf).strip():
            yield _join(buf)
        return
    # paragraph: blocks between blank lines, merged greedily until >= n characters
    buf, pending, chars = [], [], 0  # pending: blank lines seen after a block
    for line in lines:
        if not line.strip():
            if buf:
                pending.append(line)
            continue
        if pending:  # a new block starts
            if chars >= n:
                yield _join(buf)
                buf, chars = [], 0
            else:
                buf.extend(pending)
            pending = []
        buf.append(line)
        chars += len(line)
    if buf:
        yield _join(buf)


def _read_folder(p: Path) -> Iterator[Document]:
    files = sorted(
        (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
         and not any(part.startswith(".") for part in f.relative_to(p).parts)),
        key=lambda f: f.relative_to(p).as_posix(),
    )
    if not files:
        raise ValueError(
            f"{p}: folder has no text files ({', '.join(TEXT_SUFFIXES)}) and is not a HF dataset"
        )

    def gen():
        for i, f in enumerate(files):
            text = f.read_bytes().decode("utf-8", errors="replace")
            yield Document(i, text, {"path": f.relative_to(p).as_posix()})

    return gen()


def _require_datasets():
    try:
        import datasets
    except ImportError as e:  # optional dependency
        raise ImportError(
            "reading or writing a HF dataset needs the optional package 'datasets' "
            "(pip install datasets)"
        ) from e
    return datasets


def _load_hf(p: Path, hf_split: str | None):
    datasets = _require_datasets()
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if hf_split is None:
            if len(names) == 1:
                hf_split = names[0]
            elif "train" in names:
                hf_split = "train"
            else:
                raise ValueError(f"{p}: a DatasetDict with splits {names}; pass hf_split=")
        check_choice("hf_split", hf_split, names)
        ds = ds[hf_split]
    return ds


def _read_hf(p: Path, text_field: str, hf_split: str | None) -> Iterator[Document]:
    ds = _load_hf(p, hf_split)
    if text_field not in ds.column_names:
        raise ValueError(
            f"{p}: no column {text_field!r} (columns: {', '.join(map(repr, ds.column_names))}); "
            "choose the text column with text_field= / --text-field"
        )

    def gen():
        # the dataset is memory-mapped arrow: iterating reads one batch at a time
        for i, rec in enumerate(ds):
            text = rec.pop(text_field)
            if not isinstance(text, str):
                raise ValueError(f"{p}: row {i}: column {text_field!r} must be a string")
            yield Document(i, text, rec)

    return gen()


# ----------------------------------------------------------------------------------------
# writers


def _out_format(out: Path, like_fmt: str | None) -> str:
    if out.suffix.lower() in JSONL_SUFFIXES + (".parquet",) + TEXT_SUFFIXES:
        return _format_from_suffix(out, "out")
    if out.suffix:
        _format_from_suffix(out, "out")  # raises with the list of known suffixes
    return "hf" if like_fmt == "hf" else "folder"


def output_is_folder(path: str | os.PathLike, like_fmt: str | None = None) -> bool:
    """Whether :func:`write_documents` writes ``path`` as a folder (text files or a HF
    dataset) rather than one file; raises ``ValueError`` for an unknown suffix."""
    return _out_format(Path(path), like_fmt) in ("folder", "hf")


def _check_out(out: Path, fmt: str, overwrite: bool) -> None:
    if fmt in ("folder", "hf"):
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
            raise ValueError(f"out {str(out)!r} exists and is not an empty folder"
                             + ("" if overwrite or not out.is_dir() else " (pass overwrite=True to replace it)"))
    elif out.is_dir():
        raise ValueError(f"out {str(out)!r} is a folder; a {fmt} output is one file")


def write_documents(
    docs: Iterable[Document],
    path: str | os.PathLike,
    like: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
    split: str | None = None,
    hf_split: str | None = None,
    overwrite: bool = False,
) -> int:
    """Write ``docs`` to ``path``; returns the number written.

    The output format is decided by ``path``'s suffix (a path without a suffix is a folder
    of text files, or a HF dataset when ``like`` is one). When ``like`` (the source corpus)
    has the same format, its details are kept: the parquet schema, the HF features, the
    text files themselves (copied byte for byte), the text file's split rule. Files are
    written atomically; a folder output must not exist yet or be empty (``overwrite=True``:
    a non-empty one is replaced once the new one is complete)."""
    out = Path(path)
    like_p = Path(like) if like is not None else None
    like_fmt = detect_format(like_p) if like_p is not None else None
    fmt = _out_format(out, like_fmt)
    same = like_fmt == fmt
    _check_out(out, fmt, overwrite)
    if fmt == "jsonl":
        return _write_jsonl(docs, out, text_field)
    if fmt == "parquet":
        return _write_parquet(docs, out, text_field, like_p if same else None)
    if fmt == "txt":
        if split is None or split == "auto":  # (a jsonl/parquet source has no split: "auto")
            split = resolve_split(like_p) if same else f"paragraph:{DEFAULT_PARAGRAPH_CHARS}"
        return _write_txt(docs, out, _separator(split))
    if fmt == "folder":
        return _write_folder(docs, out, like_p if same else None)
    return _write_hf(docs, out, text_field, like_p if same else None, hf_split)


def _record(doc: Document, text_field: str) -> dict:
    rec = {text_field: doc.text}
    rec.update((k, v) for k, v in doc.meta.items() if k != text_field)
    return rec


def _write_jsonl(docs, out: Path, text_field: str) -> int:
    n = 0
    with atomic_open(out, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(_record(doc, text_field), ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_parquet(docs, out: Path, text_field: str, like: Path | None, chunk: int = 1024) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(like) if like is not None else None
    tmp = atomic_tmp_path(out)
    writer, n, it = None, 0, iter(docs)
    try:
        while True:
            recs = [_record(d, text_field) for d in itertools.islice(it, chunk)]
            if not recs:
                break
            table = pa.Table.from_pylist(recs, schema=schema)
            if writer is None:  # no `like`: the first chunk decides the schema
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table)
            n += len(recs)
        if writer is None:  # no documents: an empty file with the schema
            writer = pq.ParquetWriter(tmp, schema or pa.schema([(text_field, pa.string())]))
        writer.close()
        commit(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return n


def _write_txt(docs, out: Path, sep: str) -> int:
    n = 0
    with atomic_open(out, "w", encoding="utf-8") as f:
        for doc in docs:
            if n:
                f.write(sep)
            f.write(doc.text)
            n += 1
        if n:
            f.write("\n")
    return n


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_tmp_path(out)
    tmp.unlink()
    tmp.mkdir()
    return tmp


def _finish_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        if any(out.iterdir()):  # overwrite=True (checked before writing): swap, then delete the old one
            old = _staging_dir(out)
            old.rmdir()
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        out.rmdir()
    os.replace(tmp, out)


def _write_folder(docs, out: Path, like: Path | None) -> int:
    tmp, n = _staging_dir(out), 0
    try:
        for doc in docs:
            rel = doc.meta.get("path") or f"doc-{doc.id:08d}.txt"
            dest = tmp / rel
            if tmp.resolve() not in dest.resolve().parents:
                raise ValueError(f"document {doc.id}: meta['path'] {rel!r} leaves the output folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = like / rel if like is not None and "path" in doc.meta else None
            if src is not None and src.is_file():
                shutil.copyfile(src, dest)
            else:
                dest.write_text(doc.text, encoding="utf-8")
            n += 1
        _finish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n


def _write_hf(docs, out: Path, text_field: str, like: Path | None, hf_split) -> int:
    datasets = _require_datasets()
    features = _load_hf(like, hf_split).features if like is not None else None
    recs = [_record(d, text_field) for d in docs]  # datasets builds its arrow table in memory
    ds = datasets.Dataset.from_list(recs, features=features)
    _save_hf(ds, out)
    return len(recs)


def _save_hf(ds, out: Path) -> None:
    tmp = _staging_dir(out)
    try:
        ds.save_to_disk(str(tmp))
        _finish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_selected(
    source: str | os.PathLike,
    ids: Iterable[int] | np.ndarray,
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "auto",
    hf_split: str | None = None,
    n_docs: int | None = None,
    overwrite: bool = False,
) -> int:
    """Write the documents of ``source`` whose ids are in ``ids`` to ``out`` (streaming; in
    ``out``'s format, keeping the source's details as :func:`write_documents` does).
    ``n_docs``, when given, is checked against the source (a changed source would map the
    ids to other documents) before the output is committed: on a mismatch ``out`` is left as
    it was."""
    source = Path(source)
    n_docs = check_optional_int("n_docs", n_docs, 0)
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if ids.size and ids.dtype.kind not in "iu":  # (a float would be truncated to another id)
        raise TypeError(f"ids must be integers (document ids), got dtype {ids.dtype}")
    ids = np.unique(ids.astype(np.int64))
    fmt = detect_format(source)
    if fmt == "txt":
        split = resolve_split(source, split)
    out_p = Path(out)
    if fmt == "hf" and _out_format(out_p, fmt) == "hf":
        ds = _load_hf(source, hf_split)  # exact and memory-mapped: Dataset.select
        _check_count(len(ds), n_docs, source)
        _check_ids(ids, len(ds))
        _check_out(out_p, "hf", overwrite)
        _save_hf(ds.select(ids.tolist()), out_p)
        return len(ids)
    keep = set(ids.tolist())

    def chosen():
        seen = 0
        for doc in read_documents(source, text_field, split=split, format=fmt, hf_split=hf_split):
            seen += 1
            if doc.id in keep:
                yield doc
        # raised inside the writer's loop, so the half-written output is discarded, not committed
        _check_count(seen, n_docs, source)
        _check_ids(ids, seen)

    return write_documents(chosen(), out_p, like=source, text_field=text_field, split=split,
                           hf_split=hf_split, overwrite=overwrite)


def _check_count(found: int, expected: int | None, source) -> None:
    if expected is not None and found != expected:
        raise ValueError(
            f"{source}: has {found} documents but the scores were computed for {expected}; "
            "the pool changed since scoring"
        )


def _check_ids(ids: np.ndarray, n: int) -> None:
    if len(ids) and (ids[0] < 0 or ids[-1] >= n):
        raise ValueError(f"ids must be in [0, {n}), got {ids[0]}..{ids[-1]}")
