"""The embedded default corpus, built at run time from the running Python's help topics,
standard-library docstrings and source (no download): whole units (a topic or a module) go
to the held-out target or to the pool, and a share of the pool is corrupted in one of the
``CORRUPTION_KINDS`` ways, labelled in ``Corpus.labels``/``Corpus.kinds``. Deterministic
from ``seed`` for a given Python installation. Sources, corruptions and sizes: docs/data.md §4.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from thresher.core.checks import check_choice, check_finite_range, check_int

from .documents import Document, write_documents

__all__ = ["Corpus", "embedded_corpus", "embedded_size", "embedded_size_arg", "CORRUPTION_KINDS", "EMBEDDED_SIZES"]

# name -> (pool documents, target documents, per-unit cap multiplier)
EMBEDDED_SIZES = {"quick": (1500, 300, 1), "default": (5000, 1000, 3)}
CORRUPTION_KINDS = ("shuffled", "char_noise", "repeated", "boilerplate", "random_bytes")
MAX_CHARS, MIN_CHARS = 1500, 200
# documents kept per unit and source (evenly spread over the unit): no single big module
# dominates, and prose (topics, docstrings) is about half of the clean text, not a minority
MAX_DOCS_PER_UNIT = {"topic": 12, "docstring": 10, "code": 4}
MAX_FILE_BYTES = 300_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages", "_bundled"}


@dataclass
class Corpus:
    pool: list[Document]
    target: list[Document]
    labels: np.ndarray  # bool (len(pool),): True = corrupted
    kinds: np.ndarray  # str (len(pool),): corruption kind or ""
    sources: np.ndarray  # str (len(pool),): "topic" | "docstring" | "code"
    seed: int = 0
    size: str | int = "default"
    info: dict = field(default_factory=dict)

    def write(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """pool.jsonl and target.jsonl (fields text, source, unit, kind, corrupted) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_documents(self.pool, folder / "pool.jsonl")
        write_documents(self.target, folder / "target.jsonl")
        return folder / "pool.jsonl", folder / "target.jsonl"


# ----------------------------------------------------------------------------------------
# clean text


def _chunk(text: str, sep: str = "\n\n") -> list[str]:
    """Greedy chunks of <= MAX_CHARS at ``sep`` boundaries (over-long pieces cut at lines,
    then hard), dropping chunks shorter than MIN_CHARS."""
    pieces: list[str] = []
    for part in text.split(sep):
        if len(part) <= MAX_CHARS:
            pieces.append(part)
            continue
        line_buf = ""
        for line in part.split("\n"):
            while len(line) > MAX_CHARS:
                pieces.append(line[:MAX_CHARS])
                line = line[MAX_CHARS:]
            if len(line_buf) + len(line) + 1 > MAX_CHARS:
                pieces.append(line_buf)
                line_buf = ""
            line_buf = f"{line_buf}\n{line}" if line_buf else line
        pieces.append(line_buf)
    out, buf = [], ""
    for p in pieces:
        if buf and len(buf) + len(sep) + len(p) > MAX_CHARS:
            out.append(buf)
            buf = ""
        buf = f"{buf}{sep}{p}" if buf else p
    out.append(buf)
    return [c.strip("\n") for c in out if len(c.strip()) >= MIN_CHARS]


def _spread(docs: list[str], k: int) -> list[str]:
    """At most k documents, evenly spaced over the unit (beginning, middle and end)."""
    if len(docs) <= k:
        return docs
    return [docs[i] for i in np.linspace(0, len(docs) - 1, k).round().astype(int)]


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if not f.endswith(".py") or f.startswith("test_") or f.startswith("."):
                continue
            path = Path(dirpath) / f
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
            except OSError:
                continue
            files.append((path.relative_to(root).as_posix(), path))
    return files


def _docstring_text(tree: ast.Module, name: str) -> str:
    entries = []
    doc = ast.get_docstring(tree)
    if doc:
        entries.append(f"Module {name}\n\n{doc}")

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                d = ast.get_docstring(child)
                if d:
                    if isinstance(child, ast.ClassDef):
                        head = f"class {qual}"
                    else:
                        head = f"def {qual}({ast.unparse(child.args)})"
                    entries.append(f"{head}\n    {d}")
                if isinstance(child, ast.ClassDef):
                    visit(child, qual + ".")

    visit(tree, "")
    return "\n\n".join(entries)


def _code_chunks(source: str) -> list[str]:
    """Top-level blocks (a new block at a column-0 def/class/decorator) grouped to <= MAX_CHARS."""
    blocks, cur = [], []
    for line in source.split("\n"):
        if line.startswith(("def ", "class ", "async def ", "@")) and cur and not cur[-1].startswith("@"):
            blocks.append("\n".join(cur))
            cur = []
        cur.append(line)
    blocks.append("\n".join(cur))
    return _chunk("\n\n\n".join(b.strip("\n") for b in blocks), sep="\n\n\n")


def _unit_docs(unit: tuple, scale: int) -> list[tuple[str, str]]:
    """(source, text) documents of one unit, at most ``scale * MAX_DOCS_PER_UNIT[source]``."""
    kind, name, payload = unit
    cap = {k: scale * v for k, v in MAX_DOCS_PER_UNIT.items()}
    if kind == "topic":
        return [("topic", t) for t in _spread(_chunk(payload), cap["topic"])]
    try:
        source = payload.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    module = name[:-3].replace("/", ".").removesuffix(".__init__")
    docs = [("docstring", t) for t in _spread(_chunk(_docstring_text(tree, module)), cap["docstring"])]
    docs += [("code", t) for t in _spread(_code_chunks(source), cap["code"])]
    return docs


def _units(rng: np.random.Generator) -> Iterator[tuple]:
    from pydoc_data.topics import topics

    units = [("topic", k, topics[k]) for k in sorted(topics)]
    units += [("module", rel, path) for rel, path in _stdlib_files()]
    for i in rng.permutation(len(units)):
        yield units[int(i)]


# ----------------------------------------------------------------------------------------
# corruption

_PRINTABLE = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                           "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ "))
_BOILERPLATE = (
    "We use cookies to improve your experience. By continuing to browse you agree to our use of cookies.",
    "Accept all cookies | Manage preferences | Reject non-essential",
    "Home | About us | Products | Services | Blog | Careers | Contact",
    "Share on Facebook  Share on Twitter  Share on LinkedIn  Email this page",
    "Subscribe to our newsletter to get the latest deals delivered straight to your inbox!",
    "Click here to download the free trial. No credit card required.",
    "Copyright (c) {year} All rights reserved. Terms of Use | Privacy Policy | Sitemap",
    "Page {n} of {m}   < Previous   Next >",
    "Sign in  |  Register  |  Forgot your password?",
    "Sponsored content: You won't believe what happened next. Read more >>",
    "Loading... please wait. If the page does not load, click here to refresh.",
    "Related posts: Top 10 tips  |  Best offers of {year}  |  Customer reviews ({n})",
    "This site is protected by reCAPTCHA and the Google Privacy Policy and Terms of Service apply.",
    "Add to cart  -  Buy now  -  Free shipping on orders over ${n}",
    "Skip to main content  Skip to navigation  Accessibility statement",
)


def corrupt(text: str, kind: str, rng: np.random.Generator) -> str:
    """``text`` damaged in one of the ``CORRUPTION_KINDS`` ways (the embedded corpus's
    corrupted documents; the experiments corrupt other corpora with it)."""
    check_choice("kind", kind, CORRUPTION_KINDS)
    n = len(text)
    if kind == "shuffled":
        words = text.split()
        rng.shuffle(words)
        lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
        return "\n".join(lines)
    if kind == "char_noise":
        chars = np.array(list(text))
        hit = rng.random(n) < 0.25
        chars[hit] = _PRINTABLE[rng.integers(0, len(_PRINTABLE), int(hit.sum()))]
        return "".join(chars.tolist())
    if kind == "repeated":
        lines = [ln for ln in text.split("\n") if ln.strip()] or [text]
        pick = [lines[int(i)] for i in rng.choice(len(lines), size=min(len(lines), int(rng.integers(1, 4))), replace=False)]
        out, i = [], 0
        while sum(map(len, out)) + len(out) < n:
            out.append(pick[i % len(pick)])
            i += 1
        return "\n".join(out)
    if kind == "boilerplate":
        out = []
        while sum(map(len, out)) + len(out) < n:
            line = _BOILERPLATE[int(rng.integers(len(_BOILERPLATE)))]
            out.append(line.format(year=int(rng.integers(1998, 2026)), n=int(rng.integers(2, 500)),
                                   m=int(rng.integers(500, 999))))
        return "\n".join(out)
    # random_bytes: printable Latin-1 (no C0/C1 control characters) with a line break every ~80
    v = rng.integers(0, 95 + 96, size=n)  # 95 codes in 32..126, 96 in 160..255
    b = np.where(v < 95, 32 + v, 160 + v - 95)
    b[rng.random(n) < 1 / 80] = 10
    return bytes(b.astype(np.uint8).tolist()).decode("latin-1")


# ----------------------------------------------------------------------------------------


def embedded_size(value, name: str = "size") -> str | int:
    """The one rule for a size of the embedded corpus: a name in ``EMBEDDED_SIZES``, or a
    number of pool documents >= 10 (an int, or its digits as a command line or a JSON config
    gives them). Returns the name or the int; ValueError/TypeError naming ``name`` otherwise."""
    if isinstance(value, str):
        if value in EMBEDDED_SIZES:
            return value
        if not value.isdigit():
            raise ValueError(f"{name} must be {', '.join(EMBEDDED_SIZES)} or a number of pool "
                             f"documents >= 10, got {value!r}")
        value = int(value)
    return check_int(name, value, 10)


def embedded_size_arg(text: str):
    """argparse ``type`` of ``--embedded-size`` (:func:`embedded_size`; an error names the flag
    before anything runs)."""
    import argparse

    try:
        return embedded_size(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {' or '.join(EMBEDDED_SIZES)} or a number of "
                                         f"pool documents >= 10, got {text!r}") from None


def embedded_corpus(seed: int = 0, size: str | int = "default", *, corrupt_fraction: float = 0.5) -> Corpus:
    """Build the embedded corpus (docs/data.md §4). Deterministic from ``seed``."""
    size = embedded_size(size)
    if isinstance(size, str):
        n_pool, n_target, scale = EMBEDDED_SIZES[size]
    else:
        n_pool = size
        n_target = max(2, n_pool // 5)
        scale = -(-(n_pool + n_target) // 3000)
    check_finite_range("corrupt_fraction", corrupt_fraction, 0.0, 1.0, hi_open=True)
    seed = check_int("seed", seed, 0)
    rng = np.random.default_rng([seed, 0x7E5])
    target_share = n_target / (n_pool + n_target)
    pool_raw: list[tuple[str, str, str]] = []  # (source, unit, text)
    target_raw: list[tuple[str, str, str]] = []
    units_seen = {"pool": 0, "target": 0}
    for unit in _units(rng):
        if len(pool_raw) >= n_pool and len(target_raw) >= n_target:
            break
        to_target = rng.random() < target_share
        if to_target and len(target_raw) >= n_target:
            to_target = False
        if not to_target and len(pool_raw) >= n_pool:
            to_target = True
        docs = _unit_docs(unit, scale)
        if not docs:
            continue
        dest = target_raw if to_target else pool_raw
        units_seen["target" if to_target else "pool"] += 1
        dest.extend((src, f"{unit[0]}:{unit[1]}", text) for src, text in docs)
    pool_raw, target_raw = pool_raw[:n_pool], target_raw[:n_target]
    if len(pool_raw) < n_pool or len(target_raw) < n_target:
        raise ValueError(
            f"this Python installation yields only {len(pool_raw)} pool / {len(target_raw)} target "
            f"documents, fewer than size={size!r} asks ({n_pool} / {n_target}); pass a smaller size"
        )

    # shuffle the pool so corrupted and clean documents interleave, then corrupt a share
    order = rng.permutation(len(pool_raw))
    pool_raw = [pool_raw[int(i)] for i in order]
    n_bad = int(round(corrupt_fraction * len(pool_raw)))
    bad = rng.permutation(len(pool_raw))[:n_bad]
    kinds = np.full(len(pool_raw), "", dtype=object)
    for j, i in enumerate(bad):
        kinds[int(i)] = CORRUPTION_KINDS[j % len(CORRUPTION_KINDS)]
    pool, sources = [], []
    for i, (src, unit, text) in enumerate(pool_raw):
        kind = kinds[i]
        if kind:
            text = corrupt(text, kind, rng)
        pool.append(Document(i, text, {"source": src, "unit": unit, "kind": kind, "corrupted": bool(kind)}))
        sources.append(src)
    target = [Document(i, text, {"source": src, "unit": unit}) for i, (src, unit, text) in enumerate(target_raw)]
    info = {"units": units_seen, "pool_chars": sum(len(d.text) for d in pool),
            "target_chars": sum(len(d.text) for d in target), "corrupt_fraction": corrupt_fraction}
    return Corpus(pool, target, kinds.astype(str) != "", kinds.astype(str), np.array(sources, dtype=str),
                  seed, size, info)
