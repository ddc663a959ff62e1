"""Child processes for the Triton tests (one implementation for every op family's test).

TRITON_INTERPRET is read when triton is imported, so the interpreter runs and the AOT
compiles (which need it off) each get their own Python process: a test module re-runs
itself as ``python test_x.py MODE ...``, prints one ``MARK + json`` line, and the parent
starts all children at once and collects them lazily.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MARK = "@@RESULTS@@"
CHILD_TIMEOUT_S = 600


class Child:
    def __init__(self, script: str, args: list[str], interpret: bool):
        env = dict(os.environ)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        self.args = args
        self.proc = subprocess.Popen([sys.executable, script, *args], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._result = None

    def result(self):
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
                pytest.fail(f"child {self.args} timed out\n{err[-4000:]}")
            line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(MARK)), None)
            if self.proc.returncode != 0 or line is None:
                pytest.fail(f"child {self.args} failed (rc {self.proc.returncode}):\n"
                            f"{out[-2000:]}\n{err[-6000:]}")
            self._result = json.loads(line[len(MARK):])
        return self._result

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def emit(result) -> None:
    """The child's last line: what ``Child.result`` parses."""
    print(MARK + json.dumps(result), flush=True)


def run_jobs(jobs) -> dict:
    """``{name: job()}`` for ``(name, job)`` pairs; a job that raises reports its traceback as
    its list of problems (so one broken case fails one test, not the whole child)."""
    import traceback

    results = {}
    for name, job in jobs:
        try:
            results[name] = job()
        except Exception:  # noqa: BLE001
            results[name] = [traceback.format_exc()]
    return results


def assert_compiled_cleanly(stats) -> None:
    """AOT statistics of every compiled kernel: no register spills, and a register count
    a kernel can launch with (1..255 per thread)."""
    spilling = [s for s in stats if s["n_spills"] != 0]
    assert not spilling, spilling
    assert all(0 < s["n_regs"] <= 255 for s in stats), stats
