"""ScoreJob and SelectJob from Python (thresher.jobs.score / .select): configs built in code,
their JSON round trip, the steps one by one, resume after an interruption, and the selection
written in the pool's format. A registered test scorer marks the documents that say KEEP, so
the right answer is known."""
from __future__ import annotations

import json

import numpy as np
import pytest

from thresher.jobs import JobError, ScoreConfig, ScoreJob, SelectConfig, SelectJob
from thresher.selection import register_scorer
from thresher.selection.base import Scorer
from thresher.selection.registry import SCORERS

KEEP = {0, 3, 4, 9}
N_DOCS = 12


@pytest.fixture
def marker(monkeypatch):
    monkeypatch.setattr(SCORERS, "_classes", dict(SCORERS._classes))  # undone after the test

    @register_scorer("marker")
    class Marker(Scorer):
        """1 for a sample whose bytes contain KEEP; ``fail_after`` shards interrupt the run."""

        calls: list = []
        fail_after = None

        def _fit(self, pool, target, progress):
            pass

        def _score(self, samples, batch_size, progress):
            if Marker.fail_after is not None and len(Marker.calls) >= Marker.fail_after:
                raise KeyboardInterrupt
            Marker.calls.append(len(samples))
            return np.array([float(b"KEEP" in bytes(t for t in row[:n] if t < 256))
                             for row, n in zip(samples.input_ids.tolist(), samples.lengths.tolist())])

    return Marker


def _inputs(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": i, "text": ("KEEP " if i in KEEP else "drop ")
                                        + f"document {i} " + "lorem ipsum " * (i % 4 + 1)}) + "\n"
                            for i in range(N_DOCS)))
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": f"target {i} lorem"}) + "\n" for i in range(3)))
    return pool, target


def _config(tmp_path, **kw) -> ScoreConfig:
    pool, target = _inputs(tmp_path)
    return ScoreConfig(**{**dict(method="marker", pool=str(pool), target=str(target),
                                 out=str(tmp_path / "scores"), tokenizer="byte", seq_len=16,
                                 shard_size=4, no_progress=True), **kw})


def test_score_then_select_from_python(tmp_path, marker):
    cfg = _config(tmp_path)
    assert ScoreConfig.from_json(cfg.to_json()) == cfg
    manifest = ScoreJob(cfg).run()
    assert manifest["method"] == "marker" and manifest["counts"]["pool_docs"] == N_DOCS
    doc = np.load(tmp_path / "scores" / "doc_scores.npy")
    assert set(np.flatnonzero(doc > 0)) == KEEP  # KEEP is in a document's first sample

    sel = SelectConfig(scores=str(tmp_path / "scores"), out=str(tmp_path / "sel.jsonl"),
                       fraction=len(KEEP) / N_DOCS, ids_out=str(tmp_path / "ids.npy"))
    assert SelectConfig.from_json(sel.to_json()) == sel
    result = SelectJob(sel).run()
    assert result["selected"] == len(KEEP) and set(result["ids"].tolist()) == KEEP
    kept = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in kept) == sorted(KEEP)  # the pool's own fields kept
    assert set(np.load(tmp_path / "ids.npy").tolist()) == KEEP
    with pytest.raises(JobError, match="already exists; pass --overwrite"):
        SelectJob(sel).run()
    assert SelectJob(sel.replace(overwrite=True, strategy="threshold", threshold=1e-6,
                                 fraction=None)).run()["selected"] == len(KEEP)


def test_the_steps_one_by_one_and_resume(tmp_path, marker):
    cfg = _config(tmp_path)
    marker.fail_after = 1
    job = ScoreJob(cfg)
    job.prepare()
    assert job.fit() is job.scorer
    with pytest.raises(KeyboardInterrupt):
        job.score()
    assert job.finalize()  # shards are missing: nothing merged
    assert not (tmp_path / "scores" / "manifest.json").exists()
    n_shards = len(job.finalize()) + 1
    marker.calls, marker.fail_after = [], None
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        ScoreJob(cfg).run()
    assert ScoreJob(cfg.replace(resume=True)).run()["counts"]["shards"] == n_shards
    assert len(marker.calls) == n_shards - 1  # the finished shard was kept


def test_bad_configs_name_the_field(tmp_path, marker):
    with pytest.raises(TypeError, match="missing .*'out'"):
        ScoreConfig(method="marker", pool="p", target="t")
    with pytest.raises(JobError, match="--method must be one of .*got 'markr'"):
        ScoreJob(_config(tmp_path, method="markr")).run()
    with pytest.raises(JobError, match="--seq-len must be >= 2"):
        ScoreJob(_config(tmp_path, seq_len=1)).run()
    with pytest.raises(JobError, match="--strategy topk needs --fraction"):
        SelectJob(SelectConfig(scores=str(tmp_path), out=str(tmp_path / "x.jsonl"))).run()
    with pytest.raises(JobError, match="--reduce must be one of mean"):
        SelectJob(SelectConfig(scores=str(tmp_path), out="x.jsonl", fraction=0.5, reduce="avg")).run()
    assert not (tmp_path / "scores").exists()
