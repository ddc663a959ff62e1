"""The package layout's import rules (docs/architecture.md, "What depends on what"), read from
the source with ``ast``: which thresher package may import which, and that nothing imports the
CLI. Every import counts, also the ones inside functions (they are deferred, not absent)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {p.name: p for p in (ROOT / "python" / "thresher").iterdir()
           if p.is_dir() and (p / "__init__.py").exists()}

# package -> the thresher packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "ops": {"core", "kernels"},
    # the payload layouts both need are thresher.core.layouts: kernels never import ops
    "kernels": {"core"},
    "comm": {"core", "ops"},
    "optim": {"core", "ops", "comm"},
    "data": {"core"},
    "models": {"core", "ops"},
    "selection": {"core", "ops", "models", "data"},
    "integrations": {"core", "ops", "models", "optim", "selection", "comm"},
    "jobs": {"core", "ops", "comm", "optim", "data", "models", "selection", "integrations"},
    "cli": {"core", "ops", "comm", "optim", "data", "models", "selection", "integrations", "jobs"},
}


def _imported_packages(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "thresher" and len(parts) > 1 and parts[1] in SOURCES:
                found.add(parts[1])
    return found - {package}


def test_every_package_is_in_the_table():
    assert set(SOURCES) == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_layout_allows(package):
    bad = {}
    for path in sorted(SOURCES[package].rglob("*.py")):
        extra = _imported_packages(path, package) - ALLOWED[package]
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"imports against the layout (docs/architecture.md): {bad}"


def test_top_level_modules_import_no_cli_but_main():
    for path in (ROOT / "python" / "thresher").glob("*.py"):
        if path.name != "__main__.py":
            assert "cli" not in _imported_packages(path, ""), path


def test_core_checks_and_files_import_no_torch():
    # The scalar checks serve argument parsing and the data readers, which answer
    # `thresher <command> --help` without loading torch (tests/cli/test_entry.py checks the
    # commands themselves); a module-level torch import in core would undo that for all.
    code = ("import sys, thresher.core.checks, thresher.core.constants, thresher.core.files, "
            "thresher.core.layouts, thresher.core.lazy; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
