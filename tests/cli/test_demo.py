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
    assert data["parts"] == 1 and "Resumed run" not in report
    # the report explains itself: columns, direction, the corrupted share kept, the seed
    for text in ("lower is better", "higher is better", "corrupted kept", "seed 0", "not reached"):
        assert text in report, text
    for m in ("random", "loss", "bliss"):
        assert 0.0 <= by[f"{m}+lordo"]["corrupt_kept"] <= 1.0
        kept = [json.loads(x) for x in (out / "select" / m / "selected.jsonl").read_text().splitlines()]
        assert all("corrupted" in k for k in kept)  # the kept files carry the flag
    # the per-method lines come as each method finishes, and say where the time went
    assert proc.stdout.index("      random:") < proc.stdout.index("[3/5]")
    assert "MB (checkpoints" in proc.stdout
    assert (out / "curves.png").stat().st_size > 10_000
    for m in ("random", "loss", "bliss"):
        assert (out / "select" / m / "selected.jsonl").stat().st_size > 0


def test_resume_reuses_finished_stages(quick_run):
    out, _ = quick_run
    first = json.loads((out / "report.json").read_text())
    before = first["rows"]
    proc = _demo("--quick", "--out", str(out), cwd=out)  # without --resume: refused, nothing touched
    assert proc.returncode == 2 and "already holds a run; pass --resume" in proc.stderr, proc.stderr[-2000:]
    proc = _demo("--quick", "--resume", "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = json.loads((out / "report.json").read_text())
    assert [r["val_loss"] for r in after["rows"]] == [r["val_loss"] for r in before]
    assert after["stages_this_run_s"]["train"] < 5.0  # nothing retrained
    assert after["parts"] == 2 and "Resumed run" in (out / "report.md").read_text()
    # the stage times add up the parts, so they agree with the per-method selection times
    assert after["stages_s"]["select"] >= first["stages_s"]["select"]
    assert after["stages_s"]["select"] >= max(r["select_wall_s"] for r in after["rows"] if r["select_wall_s"])


@pytest.mark.parametrize("args,match", [
    (["--fraction", "0"], "--fraction must be in"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--pool", "/no/such/pool.jsonl", "--target", "/no/such/t.jsonl"], "no such file"),
])
def test_bad_arguments_are_clear_errors(tmp_path, args, match):
    proc = _demo("--quick", "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert match in proc.stderr


def test_table_says_not_reached_and_an_interrupted_stage_keeps_its_time(tmp_path):
    from thresher.jobs.demo import Run, _Clock, build_table

    summary = {"final_val_loss": 5.0, "comm_bytes_per_rank": 1, "optimizer_state_bytes": 1, "wall_s": 1.0}
    runs = [Run("random+lordo", "random", "lordo", summary, [(1, 6.0), (2, 5.0)]),
            Run("blade+lordo", "blade", "lordo", summary, [(1, 7.0), (2, 6.0)])]
    rows, table = build_table(runs, {}, {"train": 1.0})
    assert "| blade+lordo | 5.0000 | not reached |" in table and "0.00x" not in table
    clock = _Clock(tmp_path / "stages.json")
    clock.begin("select")
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        clock.end()
    again = _Clock(tmp_path / "stages.json")
    again.begin("select")
    again.end()
    assert again.parts == 2 and again.totals()["select"] >= clock.this_run["select"] > 0


def test_bad_input_found_in_the_data_stage_leaves_out_reusable(tmp_path):
    pool, target, out = tmp_path / "pool.jsonl", tmp_path / "target.jsonl", tmp_path / "o"
    pool.write_text("".join(json.dumps({"text": f"pool document {i}"}) + "\n" for i in range(5)))
    target.write_text(json.dumps({"text": "only one target document"}) + "\n")
    args = ["--quick", "--pool", str(pool), "--target", str(target), "--out", str(out)]
    for _ in range(2):  # the rerun meets the same input error, not "already holds a run"
        proc = _demo(*args, cwd=tmp_path)
        assert proc.returncode == 2 and "at least 2 target documents" in proc.stderr, proc.stderr[-2000:]
        assert list(out.iterdir()) == []
