"""`thresher train` (thresher.cli.train): spawned gloo ranks, outputs, byte counts,
resume, online selection hook, bad arguments. A microscopic GPT on a small text file with the
byte tokenizer keeps each run to seconds."""
from __future__ import annotations

import argparse
import csv
import json
import os

import pytest
import torch

from thresher.cli import train as train_cmd
from thresher.jobs.train import TrainJob

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times, "
    f"and the optimizer counts every byte it sends." for i in range(60))


def args_for(tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    return train_cmd.config_from_args(p.parse_args([
        "--corpus", str(corpus), "--tokenizer", "byte", "--seq-len", "16", "--d-model", "16",
        "--n-layers", "1", "--n-heads", "2", "--batch-size", "2", "--eval-every", "3",
        "--eval-samples", "8", "--ckpt-every", "3", "--rank", "4", "--no-progress",
        "--schedule", "constant", "--warmup", "0", "--val-every-nth", "5",
        "--data-cache", str(tmp_path / "data"), *extra]))


def launch(cfg):
    return TrainJob(cfg).run()


def test_two_spawned_ranks_write_outputs_and_count_bytes(tmp_path):
    out = tmp_path / "run"
    a = args_for(tmp_path, "--optimizer", "lordo", "--nproc", "2", "--steps", "6",
                 "--sync-every", "3", "--out", str(out))
    s = launch(a)
    assert s["world"] == 2 and s["steps"] == 6
    # dense sync of every parameter (float32) at steps 3 and 6
    assert s["comm_bytes_per_rank"] == 2 * 4 * s["model_parameters"]
    assert s["final_val_loss"] == s["final_val_loss"]  # not NaN
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert int(rows[-1]["comm_bytes"]) == s["comm_bytes_per_rank"]
    assert (out / "loss_vs_bytes.png").stat().st_size > 0
    assert json.load(open(out / "summary.json"))["tokens"] == s["tokens"]
    for r in (0, 1):  # checkpoints load under weights_only
        ck = torch.load(out / "ckpt" / f"rank{r}.pt", weights_only=True)
        assert int(ck["step"]) == 6


def test_resume_continues_bit_identically(tmp_path):
    # (LoRDO/DiLoCo/SparseLoCo resume on 2 ranks is tested in their own files)
    kw = ["--optimizer", "lowrank-adam", "--update-proj-gap", "2", "--no-plot"]
    full = launch(args_for(tmp_path, *kw, "--steps", "6", "--out", str(tmp_path / "a")))
    launch(args_for(tmp_path, *kw, "--steps", "3", "--out", str(tmp_path / "b")))
    resumed = launch(args_for(tmp_path, *kw, "--steps", "6", "--resume",
                                        "--out", str(tmp_path / "b")))
    ca = torch.load(tmp_path / "a" / "ckpt" / "rank0.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "ckpt" / "rank0.pt", weights_only=True)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert full["final_val_loss"] == resumed["final_val_loss"]
    assert full["tokens"] == resumed["tokens"]
    rows = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6]


def test_online_selection_hook(tmp_path):
    s = launch(args_for(tmp_path, "--optimizer", "adamw", "--steps", "2",
                                  "--select", "random", "--select-opt", "gamma=0.5",
                                  "--no-plot", "--out", str(tmp_path / "sel")))
    assert s["steps"] == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        launch(args_for(tmp_path, "--steps", "0", "--out", str(tmp_path / "x")))
    with pytest.raises(ValueError, match="compression must be None"):
        launch(args_for(tmp_path, "--steps", "1", "--compression", "zip",
                                  "--out", str(tmp_path / "y")))
    with pytest.raises(ValueError, match="--select-opt must be KEY=VALUE"):
        launch(args_for(tmp_path, "--steps", "1", "--select", "random",
                                  "--select-opt", "gamma", "--out", str(tmp_path / "z")))


# ----------------------------------------------------------------------------------------
# train never silently reuses or overwrites (issue 14 items 2 and 5)


def test_changed_corpus_is_tokenised_again(tmp_path):
    a = args_for(tmp_path, "--optimizer", "adamw", "--steps", "1", "--no-plot", "--out", str(tmp_path / "r1"))
    launch(a)
    first = a.data_dir()
    meta1 = json.load(open(os.path.join(first, "meta.json")))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT.replace("fox", "cat"))  # same path, same size
    b = args_for(tmp_path, "--optimizer", "adamw", "--steps", "1", "--no-plot", "--out", str(tmp_path / "r2"))
    assert b.data_dir() != first
    launch(b)
    import numpy as np

    ids = np.load(os.path.join(b.data_dir(), "train", "input_ids.npy"))
    assert b"cat" in bytes(int(t) for t in ids.reshape(-1) if t < 256)
    assert json.load(open(os.path.join(b.data_dir(), "meta.json")))["train_tokens"] == meta1["train_tokens"]


def test_existing_run_needs_resume_and_the_same_settings(tmp_path):
    out = tmp_path / "run"
    kw = ["--optimizer", "adamw", "--no-plot", "--out", str(out)]
    launch(args_for(tmp_path, *kw, "--steps", "3"))
    log = (out / "log.csv").read_bytes()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        launch(args_for(tmp_path, *kw, "--steps", "3"))
    with pytest.raises(ValueError, match=r"settings differ .*lr \(0.003 then, 0.01 now\)"):
        launch(args_for(tmp_path, *kw, "--steps", "6", "--resume", "--lr", "1e-2"))
    with pytest.raises(ValueError, match="settings differ .*seed"):
        launch(args_for(tmp_path, *kw, "--steps", "6", "--resume", "--seed", "1"))
    assert (out / "log.csv").read_bytes() == log
    s = launch(args_for(tmp_path, *kw, "--steps", "6", "--resume"))  # --steps may grow
    assert s["steps"] == 6


def test_bad_options_are_found_before_run_json(tmp_path):
    out = tmp_path / "run"
    kw = ["--optimizer", "lordo", "--steps", "1", "--no-plot", "--out", str(out)]
    with pytest.raises(ValueError, match="--lr must be a positive number"):
        launch(args_for(tmp_path, *kw, "--lr", "-1"))
    with pytest.raises(ValueError, match="compression must be None"):
        launch(args_for(tmp_path, *kw, "--compression", "zip"))
    with pytest.raises(ValueError, match="--select-opt gamma=0.5 needs --select"):
        launch(args_for(tmp_path, *kw, "--select-opt", "gamma=0.5"))
    with pytest.raises(ValueError, match="--select must be one of blade, rho"):
        launch(args_for(tmp_path, *kw, "--select", "bladee"))
    assert not (out / "run.json").exists()
    assert launch(args_for(tmp_path, *kw))["steps"] == 1  # the corrected rerun, no --resume


def test_cli_errors_are_one_line(tmp_path, capsys):
    from thresher.cli import main

    (tmp_path / "afile").write_text("x")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    base = ["train", "--corpus", str(corpus), "--tokenizer", "byte", "--steps", "1", "--no-progress"]
    for out, msg in ((tmp_path / "afile", "exists and is not a folder"),
                     (tmp_path / "afile" / "run", "Not a directory")):
        assert main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("thresher train: error: ") and msg in err and "Traceback" not in err, err
    # an option the optimizer rejects is found before the ranks start (the optimizer is built
    # once on a stand-in model): one line, and nothing written
    assert main([*base, "--nproc", "2", "--compression", "zip", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("thresher train: error: --optimizer lordo rejects its options: compression")
    assert len(err.splitlines()) == 1 and not (tmp_path / "z").exists()


def _launcher(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    code = ("import sys; from thresher.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = ["train", "--corpus", str(corpus), "--tokenizer", "byte", "--seq-len", "16", "--d-model", "16",
            "--n-layers", "1", "--n-heads", "2", "--batch-size", "2", "--steps", "1000000", "--nproc", "2",
            "--optimizer", "adamw", "--no-progress", "--no-plot", "--eval-every", "1000000",
            "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ranks_of(pid):
    """The spawned ranks (children running multiprocessing's spawn_main) of process ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
                out.append(int(d))
    return out


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond, timeout=120.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc (Linux)")
def test_killing_the_launcher_stops_its_ranks(tmp_path):
    import signal

    proc = _launcher(tmp_path)
    try:
        assert _wait(lambda: (tmp_path / "run" / "run.json").exists()), proc.stderr.read() if proc.poll() else ""
        ranks = _ranks_of(proc.pid)
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait(lambda: not any(_alive(r) for r in ranks), timeout=30), "ranks outlived the launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc (Linux)")
def test_ctrl_c_is_one_line_and_stops_the_ranks(tmp_path):
    import signal

    proc = _launcher(tmp_path)
    try:
        assert _wait(lambda: (tmp_path / "run" / "run.json").exists())
        ranks = _ranks_of(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130
        assert "thresher train: interrupted; rerun with --resume" in err and "Traceback" not in err, err
        assert _wait(lambda: not any(_alive(r) for r in ranks), timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
