"""Resume and the out folder, as a user meets them: an interrupted TrainJob / ScoreJob resumes
and loses nothing (the same log, losses, weights and scores as an uninterrupted run, bit for
bit on CPU), the same job twice, another config into a run folder, a moved run folder, a
changed corpus, and folders that hold the user's own files."""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import thresher.jobs.train as train_mod
from thresher.jobs import JobError, ScoreConfig, ScoreJob, TrainConfig, TrainJob

DOCS = [f"Document {i}: a fox jumps over {i % 7} lazy dogs and counts the bytes it sends." for i in range(40)]


def config(tmp_path, out="run", **kw) -> TrainConfig:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    base = dict(corpus=str(corpus), tokenizer="byte", seq_len=16, d_model=16, n_layers=1, n_heads=2,
                batch_size=2, eval_samples=8, rank=4, val_every_nth=5, optimizer="lowrank-adam",
                update_proj_gap=2, steps=6, eval_every=2, ckpt_every=3, warmup=2, threads=1,
                no_progress=True, no_plot=True, data_cache=str(tmp_path / "data"), out=str(tmp_path / out))
    return TrainConfig(**{**base, **kw})


def interrupt_at(monkeypatch, step):
    """Ctrl-C when the loop reaches ``step``."""
    real = train_mod._RankTrainer.step

    def step_or_stop(self, s):
        if s == step:
            raise KeyboardInterrupt
        return real(self, s)

    monkeypatch.setattr(train_mod._RankTrainer, "step", step_or_stop)


def log(folder):
    """log.csv without the wall-clock columns."""
    with open(folder / "log.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in csv.DictReader(f)]


def weights(folder):
    return torch.load(folder / "ckpt" / "rank0.pt", weights_only=True)["model"]


def test_an_interrupted_fit_resumes_to_the_same_scores_bit_for_bit(tmp_path, monkeypatch):
    import thresher.selection.base as base

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": d * 2}) + "\n" for d in DOCS))

    def cfg(out, **kw):
        return ScoreConfig(method="excess", pool=str(pool), target=str(pool), out=str(tmp_path / out),
                           tokenizer="byte", seq_len=16, steps=3, batch_size=4, shard_size=50,
                           no_progress=True, opt={"ref_steps": 2}, **kw)

    ScoreJob(cfg("full")).run()
    real, calls = base.train_lm, []

    def train_then_stop(*a, **kw):  # Ctrl-C in the second model's training
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(base, "train_lm", train_then_stop)
        with pytest.raises(KeyboardInterrupt):
            ScoreJob(cfg("run")).run()
    assert (tmp_path / "run" / "ckpt").is_dir() and not (tmp_path / "run" / "scores.npy").exists()
    ScoreJob(cfg("run", resume=True)).run()
    for name in ("scores.npy", "doc_scores.npy"):
        assert np.array_equal(np.load(tmp_path / "full" / name), np.load(tmp_path / "run" / name),
                              equal_nan=True), name
