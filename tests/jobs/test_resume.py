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


def test_an_interrupted_run_resumes_and_loses_nothing(tmp_path, monkeypatch):
    full = TrainJob(config(tmp_path, "full")).run()
    cfg = config(tmp_path)
    with monkeypatch.context() as m:
        interrupt_at(m, 5)  # after the checkpoint of step 3 and the evaluation of step 4
        with pytest.raises(KeyboardInterrupt):
            TrainJob(cfg).run()
    resumed = TrainJob(cfg.replace(resume=True)).run()
    for key in ("final_val_loss", "final_train_loss", "tokens", "comm_bytes_per_rank"):
        assert resumed[key] == full[key], key
    # the log of the resumed run is the uninterrupted one: step 4's train loss averages steps
    # 3 and 4 although step 3 ran before the interruption
    assert log(tmp_path / "run") == log(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    cfg = config(tmp_path, steps=2)
    first = TrainJob(cfg).run()
    written = (tmp_path / "run" / "summary.json").read_text()
    again = TrainJob(cfg.replace(resume=True)).run()  # nothing left to do
    assert again["final_val_loss"] == first["final_val_loss"]  # (a NaN would differ)
    assert again["final_train_loss"] == first["final_train_loss"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_val_loss"] == \
        json.loads(written)["final_val_loss"]
    assert [r["step"] for r in log(tmp_path / "run")] == ["2"]  # the log is not extended either


def test_the_same_job_twice_and_another_config_into_a_run_folder_are_refused(tmp_path):
    cfg = config(tmp_path, steps=2)
    TrainJob(cfg).run()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(JobError, match="already holds a run; pass --resume"):
        TrainJob(cfg).run()
    with pytest.raises(JobError, match=r"settings differ .*lr \(0.003 then, 0.01 now\)"):
        TrainJob(cfg.replace(lr=0.01, resume=True)).run()
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_a_moved_run_folder_resumes(tmp_path):
    TrainJob(config(tmp_path, steps=2)).run()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    resumed = TrainJob(config(tmp_path, "moved", steps=4, resume=True)).run()
    assert resumed["steps"] == 4 and [r["step"] for r in log(tmp_path / "moved")] == ["2", "4"]
    # and through another path to the same folder
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert TrainJob(config(tmp_path, steps=6, resume=True).replace(out="moved")).run()["steps"] == 6
    finally:
        os.chdir(cwd)


def test_a_changed_corpus_is_not_resumed(tmp_path):
    cfg = config(tmp_path, steps=2)
    TrainJob(cfg).run()
    with open(cfg.corpus, "a") as f:
        f.write(json.dumps({"text": "a document added after the run started"}) + "\n")
    with pytest.raises(JobError, match="settings differ .*corpus"):
        TrainJob(cfg.replace(steps=4, resume=True)).run()


def test_resume_does_not_write_into_a_folder_of_the_users_files(tmp_path):
    mine = tmp_path / "run"
    mine.mkdir()
    (mine / "summary.json").write_text("my own summary")
    with pytest.raises(JobError, match="holds no thresher run but other files .*summary.json"):
        TrainJob(config(tmp_path, resume=True)).run()
    assert [p.name for p in mine.iterdir()] == ["summary.json"]
    assert (mine / "summary.json").read_text() == "my own summary"


def test_a_failure_before_the_run_is_recorded_leaves_the_folder_reusable(tmp_path):
    def broken_model(cfg, vocab_size):  # the user's factory fails on the rank, after the data step
        raise RuntimeError("a bug in my model factory")

    cfg = config(tmp_path, data_cache=None, steps=2)
    with pytest.raises(RuntimeError, match="a bug in my model factory"):
        TrainJob(cfg, model=broken_model).run()
    assert list((tmp_path / "run").iterdir()) == []
    assert TrainJob(cfg).run()["steps"] == 2  # the corrected rerun, no resume needed


def test_an_out_folder_below_a_file_is_a_job_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(JobError, match="--out .*file/run.*cannot create the folder"):
        TrainJob(config(tmp_path, out="file/run")).run()


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
