"""`thresher` used the way a user gets it wrong (missing and extra arguments, bad values, bad
paths, an out folder that is a file): one line `thresher CMD: error: ...`, exit status 2, no
traceback, nothing written. And the command writes what the Python job writes for the same
config."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from thresher.cli import main
from thresher.jobs import ScoreConfig, ScoreJob, SelectConfig, SelectJob, TrainConfig, TrainJob

DOCS = [f"Document {i}: a fox jumps over {i % 7} lazy dogs and counts the bytes it sends." for i in range(30)]
TINY = ["--tokenizer", "byte", "--seq-len", "16", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
        "--batch-size", "2", "--eval-every", "2", "--eval-samples", "8", "--rank", "4", "--val-every-nth", "5",
        "--optimizer", "adamw", "--steps", "2", "--threads", "1", "--no-progress", "--no-plot"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
    return path


def one_line_error(capsys, argv, command="train"):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"thresher {command}: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--model", "huge"], "--model huge"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--select", "random", "--select-opt", "gama=0.5"], "--select random rejects --select-opt"),
    (["--embedded-size", "quick", "--corpus", "embedded", "--d-model", "30", "--n-heads", "4"],
     "--d-model/--n-layers/--n-heads"),
])
def test_bad_train_values_are_one_line_and_write_nothing(tmp_path, capsys, corpus, extra, message):
    err = one_line_error(capsys, ["train", "--corpus", str(corpus), *TINY, "--out", str(tmp_path / "run"), *extra])
    assert message in err and not (tmp_path / "run").exists()


def test_bad_paths_are_one_line(tmp_path, capsys, corpus):
    (tmp_path / "file").write_text("mine")
    base = ["train", "--corpus", str(corpus), *TINY]
    assert "--out " in one_line_error(capsys, [*base, "--out", str(tmp_path / "file")])
    assert "--out " in one_line_error(capsys, [*base, "--out", str(tmp_path / "file" / "run")])
    assert "--data-cache" in one_line_error(capsys, [*base, "--out", str(tmp_path / "r"),
                                                     "--data-cache", str(tmp_path / "file")])
    assert "--corpus" in one_line_error(capsys, ["train", *TINY, "--corpus", str(tmp_path / "none.jsonl")])
    assert "--scores" in one_line_error(capsys, ["select", "--scores", str(tmp_path / "file"), "--fraction",
                                                 "0.5", "--out", str(tmp_path / "s.jsonl")], "select")
    assert "--out" in one_line_error(capsys, ["score", "--method", "random", "--pool", str(corpus), "--target",
                                              str(corpus), "--out", str(tmp_path / "file")], "score")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("argv", [["train", "--steps"], ["train", "stray-positional"], ["score", "--method", "random"],
                                  ["select", "--fraction", "0.5"], ["train", "--steps", "two"],
                                  ["select", "--scores", "s", "--out", "o.jsonl", "--strategy", "best"]])
def test_missing_and_extra_arguments_are_usage_errors(tmp_path, argv):
    # argparse's own errors: exit status 2 and a usage line, in a fresh process (argparse exits)
    proc = subprocess.run([sys.executable, "-m", "thresher", *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "usage: thresher" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _without_times(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in rows]


def test_the_command_writes_what_the_python_job_writes(tmp_path, capsys, corpus):
    # train
    assert main(["train", "--corpus", str(corpus), *TINY, "--out", str(tmp_path / "cli")]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = TrainConfig(corpus=str(corpus), tokenizer="byte", seq_len=16, d_model=16, n_layers=1, n_heads=2,
                      batch_size=2, eval_every=2, eval_samples=8, rank=4, val_every_nth=5, optimizer="adamw",
                      steps=2, threads=1, no_progress=True, no_plot=True, out=str(tmp_path / "py"))
    summary = TrainJob(cfg).run()
    for name in ("config.json", "run.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("cli", "py"))
        assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}, name
    logs = [_without_times(csv.DictReader(open(tmp_path / d / "log.csv"))) for d in ("cli", "py")]
    assert logs[0] == logs[1]
    timing = ("wall_s", "tokens_per_s")
    assert {k: v for k, v in printed.items() if k not in timing} == {k: v for k, v in summary.items() if k not in timing}
    # score and select
    argv = ["--method", "random", "--pool", str(corpus), "--target", str(corpus), "--tokenizer", "byte",
            "--seq-len", "16", "--no-progress"]
    assert main(["score", *argv, "--out", str(tmp_path / "s-cli")]) == 0
    ScoreJob(ScoreConfig(method="random", pool=str(corpus), target=str(corpus), tokenizer="byte", seq_len=16,
                         no_progress=True, out=str(tmp_path / "s-py"))).run()
    m = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("s-cli", "s-py")]
    volatile = ("timings", "created", "versions", "git_commit")
    assert {k: v for k, v in m[0].items() if k not in volatile} == {k: v for k, v in m[1].items() if k not in volatile}
    assert np.array_equal(np.load(tmp_path / "s-cli" / "scores.npy"), np.load(tmp_path / "s-py" / "scores.npy"))
    assert main(["select", "--scores", str(tmp_path / "s-cli"), "--fraction", "0.3", "--strategy", "gumbel",
                 "--out", str(tmp_path / "cli.jsonl"), "--ids-out", str(tmp_path / "cli.npy")]) == 0
    SelectJob(SelectConfig(scores=str(tmp_path / "s-py"), fraction=0.3, strategy="gumbel",
                           out=str(tmp_path / "py.jsonl"), ids_out=str(tmp_path / "py.npy"))).run()
    assert (tmp_path / "cli.jsonl").read_bytes() == (tmp_path / "py.jsonl").read_bytes()
    assert np.array_equal(np.load(tmp_path / "cli.npy"), np.load(tmp_path / "py.npy"))
