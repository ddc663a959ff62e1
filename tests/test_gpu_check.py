"""benchmarks/gpu_check.sh end to end on the CPU (its --dry-run: the same stages, tiny sizes,
the installed build), a run cut short by its budget (the report must still be written), and
the argument handling of it and of benchmarks/fetch_gpu_wheels.sh (which downloads, so only
its --dry-run is run here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
FETCH = ROOT / "benchmarks" / "fetch_gpu_wheels.sh"
STAGES = ["wheels", "build", "env", "tests", "lordo_nccl", "bench_cross_entropy",
          "bench_linear_cross_entropy", "bench_compress", "bench_lowrank"]
MUST_PASS = ["build", "env", "tests", "lordo_nccl", "bench_cross_entropy",
             "bench_linear_cross_entropy", "bench_compress"]


def run(script, *args, timeout=300, site=None):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    if site is not None:  # where the wheels stage installs .whl/ (when that folder exists)
        env["THRESHER_GPU_SITE"] = str(site)
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_dry_run_writes_the_report_with_every_stage(tmp_path):
    out = tmp_path / "gpu"
    proc = run(CHECK, out, "--dry-run", "--budget-s", 240, site=tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "gpu_report.md").read_text()
    rep = json.loads((out / "gpu_report.json").read_text())
    assert [s["stage"] for s in rep["stages"]] == STAGES
    status = {s["stage"]: s["status"] for s in rep["stages"]}
    for name in MUST_PASS:
        assert status[name] == "ok", (name, status[name], (out / f"{name}.log").read_text()[-800:])
    for name in ("wheels", "bench_lowrank"):  # optional: ran, or skipped with the reason
        assert status[name] == "ok" or status[name].startswith("skipped: "), status[name]
    assert rep["env"]["device"] == "cpu" and "peers" in rep["env"]
    assert rep["tests"]["passed"] > 0 and rep["tests"]["failures"] == 0
    ok_ce = {(r["op"], r["impl"]) for r in rep["bench_cross_entropy"] if r["status"] == "ok"}
    assert {("ce", "thresher"), ("ce", "eager"), ("linear", "thresher")} <= ok_ce
    assert any(r["impl"].startswith("topk thresher cpu") for r in rep["bench_compress"])
    assert rep["lordo_smoke"]["ok"] and rep["lordo_smoke"]["process_group"] == "gloo"
    for name in STAGES:
        assert f"| {name} |" in md


def test_budget_cut_short_still_reports(tmp_path):
    out = tmp_path / "short"
    proc = run(CHECK, out, "--device", "cpu", "--budget-s", 12, timeout=120,
               site=tmp_path / "site")
    assert proc.returncode != 0  # stages it could not run make the check fail
    rep = json.loads((out / "gpu_report.json").read_text())
    status = {s["stage"]: s["status"] for s in rep["stages"]}
    assert any(s.startswith("skipped: out of budget") for s in status.values()), status
    assert (out / "gpu_report.md").exists()


@pytest.mark.parametrize("args,msg", [
    ([], "usage"), (["--dry-run"], "usage"), (["o", "--device", "tpu"], "--device must be"),
    (["o", "--budget-s", "x"], "--budget-s must be"), (["o", "--bogus"], "unknown argument"),
])
def test_gpu_check_bad_arguments(tmp_path, args, msg):
    proc = run(CHECK, *[tmp_path / a if a == "o" else a for a in args], timeout=30)
    assert proc.returncode == 2 and msg in proc.stderr


def test_fetch_wheels_dry_run_prints_one_download():
    proc = run(FETCH, "--dry-run", "--dest", "wheels-here", "--python-version", "3.12",
               timeout=30)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout
    for part in ("pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12",
                 "-d wheels-here", "liger-kernel==", "cut-cross-entropy==", "galore-torch==",
                 "setuptools==", "manylinux_2_28_x86_64"):
        assert part in cmd, part
    assert not (ROOT / "wheels-here").exists()


@pytest.mark.parametrize("args,msg", [(["--dest"], "usage"), (["--python-version", "3"],
                                      "--python-version must"), (["--nope"], "unknown argument")])
def test_fetch_wheels_bad_arguments(args, msg):
    proc = run(FETCH, *args, timeout=30)
    assert proc.returncode == 2 and msg in proc.stderr


def test_wheel_folder_is_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert proc.returncode == 0


def test_report_carries_failures_and_test_counts(tmp_path):
    """render on what a failed run leaves: the failing stage's log tail and the failed test
    cases reach gpu_report.md/.json (only those files come back from a device call)."""
    (tmp_path / "stages.jsonl").write_text(
        '{"stage": "build", "status": "failed (exit 1)", "rc": 1, "seconds": 3, "cap_s": 240, '
        '"note": ""}\n{"stage": "tests", "status": "ok", "rc": 0, "seconds": 9, "cap_s": 150, '
        '"note": ""}\n')
    (tmp_path / "build.log").write_text("compiling\nnvcc fatal: unsupported gpu architecture\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="AssertionError: off by 2"/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "render",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "gpu_report.json").read_text())
    build = rep["stages"][STAGES.index("build")]
    assert build["log_tail"][-1] == "nvcc fatal: unsupported gpu architecture"
    assert rep["stages"][STAGES.index("env")]["status"] == "not run"
    assert rep["tests"]["passed"] == 1 and rep["tests"]["failed_cases"] == ["t::b: AssertionError: off by 2"]
    md = (tmp_path / "gpu_report.md").read_text()
    assert "nvcc fatal: unsupported gpu architecture" in md and "FAILED t::b: AssertionError: off by 2" in md
