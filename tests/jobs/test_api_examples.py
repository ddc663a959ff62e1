"""The examples of docs/api.md run as written, on tiny sizes: every ```python block, and the
calls the text shows (``TrainConfig.from_json(OUT/config.json)``, ``cfg.replace(steps=...,
resume=True)``, the score steps one by one, selection). A user who copies them gets what the
page says."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

import thresher.jobs
from thresher.jobs import ScoreConfig, ScoreJob, SelectConfig, SelectJob, TrainConfig, TrainJob

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
TEXT = [f"Document {i}: a fox jumps over {i % 7} lazy dogs while the optimizer counts its bytes."
        for i in range(40)]


@dataclasses.dataclass
class TinyTrainConfig(TrainConfig):
    """TrainConfig with the example's sizes cut down (idempotent, so ``replace`` keeps them):
    steps / 100, one rank (spawned ranks: tests/cli/test_train.py), a microscopic model and
    a small BPE vocabulary."""

    def __post_init__(self):
        super().__post_init__()
        if self.steps >= 100:
            self.steps //= 100
        self.nproc, self.threads = 1, 1
        self.seq_len, self.batch_size, self.eval_samples = min(self.seq_len, 16), 2, 8
        self.d_model, self.n_layers, self.n_heads = 16, 1, 2
        self.vocab_size, self.rank, self.eval_every = min(self.vocab_size, 300), 4, 2
        self.no_progress = self.no_plot = True


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working folder holding the files the examples name (selected.jsonl, corpus.txt)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "selected.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (tmp_path / "corpus.txt").write_text("\n\n".join(TEXT))
    monkeypatch.setattr(thresher.jobs, "TrainConfig", TinyTrainConfig)  # what `from thresher.jobs import` gets
    return tmp_path


def test_the_page_has_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_each_python_block_runs_as_written(user_dir, index, capsys):
    exec(compile(python_blocks()[index], f"docs/api.md block {index}", "exec"), {"__name__": "example"})
    out = list(user_dir.glob("runs/*"))
    assert out, "the example wrote no run folder"
    for run in out:  # the outputs the page lists
        assert {"log.csv", "summary.json", "config.json", "run.json", "ckpt"} <= {p.name for p in run.iterdir()}
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_val_loss"] == summary["final_val_loss"]  # a number, not NaN


def test_a_run_folder_says_how_to_rerun_it_and_extends(user_dir):
    # "TrainConfig.from_json("runs/lordo/config.json")" and "cfg.replace(steps=600, resume=True)"
    cfg = TinyTrainConfig(corpus="selected.jsonl", optimizer="lordo", nproc=1, steps=300,
                          out="runs/lordo")
    first = TrainJob(cfg).run()
    back = TrainConfig.from_json("runs/lordo/config.json")
    assert back.to_dict() == cfg.to_dict()
    longer = TrainJob(TinyTrainConfig(**back.to_dict()).replace(steps=600, resume=True)).run()
    assert (first["steps"], longer["steps"]) == (3, 6) and longer["tokens"] > first["tokens"]


def test_scoring_and_selection_as_the_page_shows(user_dir):
    cfg = ScoreConfig(method="random", pool="selected.jsonl", target="corpus.txt", out="runs/score",
                      tokenizer="byte", seq_len=16, shard_size=7, no_progress=True)
    job = ScoreJob(cfg)
    job.prepare(), job.fit(), job.score()  # the four steps, each a method, in order
    assert job.finalize() == []
    out = user_dir / "runs" / "score"
    for name in ("scores.npy", "doc_scores.npy", "manifest.json", "run.json", "data.json",
                 "pool_samples/doc_index.npy", "pool_samples/offset.npy", "target_samples"):
        assert (out / name).exists(), name
    scores, doc = np.load(out / "scores.npy"), np.load(out / "doc_scores.npy")
    assert scores.dtype == np.float32 and doc.dtype == np.float64 and len(doc) == len(TEXT)
    assert len(scores) == len(np.load(out / "pool_samples" / "doc_index.npy"))
    # run() on the finished folder (resume=True) gives the manifest the page describes
    manifest = ScoreJob(cfg.replace(resume=True)).run()
    assert manifest["counts"]["pool_docs"] == len(TEXT) and manifest["method"] == "random"
    result = SelectJob(SelectConfig(scores="runs/score", out="selected-20.jsonl", fraction=0.2)).run()
    assert result["selected"] == 8 and len(Path("selected-20.jsonl").read_text().splitlines()) == 8
