"""`thresher train` (thresher.optim.train_cmd): spawned gloo ranks, outputs, byte counts,
resume, online selection hook, bad arguments. A microscopic GPT on a small text file with the
byte tokenizer keeps each run to seconds."""
from __future__ import annotations

import argparse
import csv
import json
import os

import pytest
import torch

from thresher.optim import train_cmd

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times, "
    f"and the optimizer counts every byte it sends." for i in range(60))


def args_for(tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    return p.parse_args([
        "--corpus", str(corpus), "--tokenizer", "byte", "--seq-len", "16", "--d-model", "16",
        "--n-layers", "1", "--n-heads", "2", "--batch-size", "2", "--eval-every", "3",
        "--eval-samples", "8", "--ckpt-every", "3", "--rank", "4", "--no-progress",
        "--schedule", "constant", "--warmup", "0", "--val-every-nth", "5",
        "--data-cache", str(tmp_path / "data"), *extra])


def test_two_spawned_ranks_write_outputs_and_count_bytes(tmp_path):
    out = tmp_path / "run"
    a = args_for(tmp_path, "--optimizer", "lordo", "--nproc", "2", "--steps", "6",
                 "--sync-every", "3", "--out", str(out))
    s = train_cmd.launch(a)
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
    full = train_cmd.launch(args_for(tmp_path, *kw, "--steps", "6", "--out", str(tmp_path / "a")))
    train_cmd.launch(args_for(tmp_path, *kw, "--steps", "3", "--out", str(tmp_path / "b")))
    resumed = train_cmd.launch(args_for(tmp_path, *kw, "--steps", "6", "--resume",
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
    s = train_cmd.launch(args_for(tmp_path, "--optimizer", "adamw", "--steps", "2",
                                  "--select", "random", "--select-opt", "gamma=0.5",
                                  "--no-plot", "--out", str(tmp_path / "sel")))
    assert s["steps"] == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        train_cmd.launch(args_for(tmp_path, "--steps", "0", "--out", str(tmp_path / "x")))
    with pytest.raises(ValueError, match="compression must be None"):
        train_cmd.launch(args_for(tmp_path, "--steps", "1", "--compression", "zip",
                                  "--out", str(tmp_path / "y")))
    with pytest.raises(ValueError, match="--select-opt must be KEY=VALUE"):
        train_cmd.launch(args_for(tmp_path, "--steps", "1", "--select", "random",
                                  "--select-opt", "gamma", "--out", str(tmp_path / "z")))
