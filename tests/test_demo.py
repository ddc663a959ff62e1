"""`thresher demo --quick` end to end (what a new user runs first), its resume, and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROWS = ("random+lordo", "loss+lordo", "bliss+lordo", "bliss+ddp", "blade+lordo")


def _demo(*args, cwd):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "thresher.cli", "demo", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = _demo("--quick", "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, proc


def test_quick_demo_reports_every_row(quick_run):
    out, proc = quick_run
    report = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in data["rows"]] == list(ROWS)
    for row in data["rows"]:
        assert row["val_loss"] is not None and 0 < row["val_loss"] < 20, row
        assert row["bytes_per_rank"] > 0 and row["opt_state_bytes"] > 0, row
        assert f"| {row['run']} |" in report and f"| {row['run']} |" in proc.stdout
    by = {r["run"]: r for r in data["rows"]}
    assert by["random+lordo"]["speedup_vs_random"] == pytest.approx(1.0)
    # LoRDO syncs every 8 steps; DDPAdamW all-reduces every step: same model, 8x the bytes
    assert by["bliss+ddp"]["bytes_per_rank"] > 4 * by["bliss+lordo"]["bytes_per_rank"]
    for m in ("random", "loss", "bliss"):
        assert 0.0 <= by[f"{m}+lordo"]["auroc"] <= 1.0
    assert set(data["stages_s"]) == {"data", "select", "train", "online", "report"}
    assert (out / "curves.png").stat().st_size > 10_000
    for m in ("random", "loss", "bliss"):
        assert (out / "select" / m / "selected.jsonl").stat().st_size > 0


def test_resume_reuses_finished_stages(quick_run):
    out, _ = quick_run
    before = json.loads((out / "report.json").read_text())["rows"]
    proc = _demo("--quick", "--resume", "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = json.loads((out / "report.json").read_text())
    assert [r["val_loss"] for r in after["rows"]] == [r["val_loss"] for r in before]
    assert after["stages_s"]["train"] < 5.0  # nothing retrained


@pytest.mark.parametrize("args,match", [
    (["--fraction", "0"], "--fraction must be in"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--pool", "/no/such/pool.jsonl", "--target", "/no/such/t.jsonl"], "no such file"),
])
def test_bad_arguments_are_clear_errors(tmp_path, args, match):
    proc = _demo("--quick", "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert match in proc.stderr
