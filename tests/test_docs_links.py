"""Every document the code and the docs point to is in the repository: ``docs/...md`` paths
in sources, README and docs, and relative ``[text](page.md)`` links in the docs, resolve; no
reference to the design notes a user who clones the repository does not have."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "python").rglob("*.py"),
           *(ROOT / "benchmarks").glob("*.py"),
           *(ROOT / "csrc").rglob("*.[ch]*")]
DOC_PATH = re.compile(r"\bdocs/[\w./-]+?\.md\b")
MD_LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)")
OUTSIDE = re.compile(r"\b(ALGORITHMS|DESIGN|INTERFACES)\.md\b|\.\./shared/(?!data\b)")


def test_every_referenced_document_exists():
    missing = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8", errors="replace")
        for ref in DOC_PATH.findall(text):
            if not (ROOT / ref).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
        if path.suffix == ".md":
            for ref in MD_LINK.findall(text):
                if not (path.parent / ref).is_file():
                    missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in SOURCES
             for m in OUTSIDE.finditer(p.read_text(encoding="utf-8", errors="replace"))]
    assert not found, found
