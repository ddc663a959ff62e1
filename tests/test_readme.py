"""The README's Python examples run as written, so the README cannot go stale.

Every ```python block of README.md is executed in a fresh interpreter, in README order, in a
temporary working directory. A block whose first line is ``# readme: no-run <reason>`` is
reported as skipped with that reason (e.g. an example that needs a GPU or torchrun).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NO_RUN = re.compile(r"#\s*readme:\s*no-run\s*(.*)")


def _blocks():
    text = README.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append(pytest.param(m.group(1), id=f"README.md:{line}"))
    return out


BLOCKS = _blocks()


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4, "README.md should show the fused loss, the optimizers, BLISS and BLADE"


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_example_runs(code, tmp_path):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    m = NO_RUN.match(first)
    if m:
        pytest.skip(f"README example marked no-run: {m.group(1) or 'no reason given'}")
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README example failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
