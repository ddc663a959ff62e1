"""The `thresher` entry points: `thresher --help` and `python -m thresher --help` answer
without importing torch (checked in a fresh interpreter through sys.modules, not by time),
`python -m thresher` runs the same command line, and the package exports what the README uses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "numpy", "tokenizers", "pyarrow") if m in sys.modules)
print("IMPORTED:" + ",".join(heavy))
"""


def _probe(module, argv):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module, argv=argv)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = proc.stdout.rsplit("IMPORTED:", 1)[1].strip()
    return proc.stdout, proc.stderr, imported


@pytest.mark.parametrize("module", ["thresher", "thresher.cli"])
@pytest.mark.parametrize("argv", [["thresher", "--help"], ["thresher", "nosuchcommand"], ["thresher"]])
def test_help_and_argument_errors_do_not_import_torch(module, argv):
    out, err, imported = _probe(module, argv)
    assert "torch" not in imported.split(","), f"{argv} imported {imported}"
    if argv[1:] == ["--help"]:
        assert "score" in out and "select" in out and "train" in out and "demo" in out
        assert "choose pretraining data" in out  # the description is for users
    else:
        assert "usage: thresher" in err


@pytest.mark.parametrize("command", ["score", "select", "train", "demo"])
def test_subcommand_help_does_not_import_torch(command):
    # the subcommand's module is imported for its arguments; its package must not pull in
    # torch (thresher.selection / .data / .optim export their names lazily)
    out, err, imported = _probe("thresher", ["thresher", command, "--help"])
    assert "torch" not in imported.split(","), f"{command} --help imported {imported}"
    assert f"usage: thresher {command}" in out


def test_subpackages_export_their_names_on_first_use():
    code = ("import sys, thresher.selection as s, thresher.data as d, thresher.optim as o;"
            "assert 'torch' not in sys.modules;"
            "assert s.build_scorer.__module__ == 'thresher.selection.base';"
            "assert o.LoRDO.__module__ == 'thresher.optim.lordo';"
            "assert d.pack.__module__ == 'thresher.data.packing';"
            "assert set(s.__all__) <= set(dir(s)) and set(o.__all__) <= set(dir(o));"
            "import pytest\n"
            "try:\n    s.no_such_name\nexcept AttributeError as e:\n    print('OK', e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "no_such_name" in proc.stdout


def test_import_thresher_is_lazy_and_exports_the_readme_names():
    code = ("import sys, thresher; assert 'torch' not in sys.modules, 'import thresher imported torch';"
            "from thresher import BackendUnavailableError, weighted_cross_entropy, native_status;"
            "import thresher.ops; assert BackendUnavailableError is thresher.ops.BackendUnavailableError;"
            "assert 'torch' in sys.modules; print(thresher.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import thresher

        thresher.nope


def test_python_dash_m_thresher_runs_a_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "thresher", "select", "--scores", str(tmp_path / "none"),
                           "--fraction", "0.5", "--out", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"thresher select: error: --scores: no such folder: {str(tmp_path / 'none')!r}"


@pytest.mark.skipif(shutil.which("thresher") is None, reason="the thresher script is not installed on PATH")
def test_installed_script_help_does_not_import_torch():
    script = shutil.which("thresher")
    code = ("import runpy, sys; sys.argv = ['thresher', '--help']\n"
            "try:\n    runpy.run_path(sys.argv0, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    proc = subprocess.run([sys.executable, "-c", code.replace("sys.argv0", repr(script))],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO-TORCH")
