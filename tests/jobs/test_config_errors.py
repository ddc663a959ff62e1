"""The four job configs as a user builds them: a JSON round trip with every field set, paths,
unknown keys, wrong types, and out-of-range values. Each bad value is an error naming the
field (TypeError at construction for a type, JobError before any work for a value), and
nothing is written."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import pytest

from thresher.jobs import (DemoConfig, DemoJob, JobError, ScoreConfig, ScoreJob, SelectConfig,
                           SelectJob, TrainConfig, TrainJob)

REQUIRED = {ScoreConfig: dict(method="random", pool="p.jsonl", target="t.jsonl", out="o"),
            SelectConfig: dict(scores="s", out="o.jsonl"), TrainConfig: {}, DemoConfig: {}}
CONFIGS = list(REQUIRED)


def _other_value(cls, f):
    """A value of field ``f`` other than its default, of a type the field declares."""
    default = cls.defaults().get(f.name)
    hint = str(f.type)
    if "dict" in hint:
        return {"gamma": 0.5, "nested": {"list": [1, 2.5, None, "x"], "flag": True}}
    if isinstance(default, bool):
        return not default
    if "float" in hint:
        return (default or 0.0) + 0.25
    if "int" in hint and not isinstance(default, str):
        return (default or 0) + 3
    return f"value-of-{f.name}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_round_trips_through_json(cls, tmp_path):
    values = {f.name: _other_value(cls, f) for f in dataclasses.fields(cls)}
    cfg = cls(**values)
    assert all(getattr(cfg, k) != cls.defaults().get(k, object()) for k in values)  # all set
    assert cls.from_json(cfg.to_json()) == cfg
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert cls.from_json(tmp_path / "c.json") == cfg == cls.from_json(str(tmp_path / "c.json"))
    none_fields = {f.name: None for f in dataclasses.fields(cls) if "None" in str(f.type)}
    cfg = cls(**{**REQUIRED[cls], **none_fields})
    assert cls.from_json(cfg.to_json()) == cfg


def test_paths_are_taken_as_their_strings(tmp_path):
    cfg = TrainConfig(corpus=tmp_path / "c.txt", out=Path("runs") / "a", data_cache=tmp_path)
    assert (cfg.corpus, cfg.out, cfg.data_cache) == (str(tmp_path / "c.txt"), "runs/a", str(tmp_path))
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert ScoreConfig(method="random", pool=tmp_path, target=tmp_path, out=tmp_path).out == str(tmp_path)


def test_a_dict_field_holds_json_values_only():
    with pytest.raises(TypeError, match="TrainConfig.select_opt must hold JSON values only"):
        TrainConfig(select="random", select_opt={"gamma": object()})
    with pytest.raises(TypeError, match="ScoreConfig.opt must hold JSON values only"):
        ScoreConfig(method="random", pool="p", target="t", out="o", opt={1: 2})  # JSON keys are str
    opts = {"betas": (0.9, 0.95)}
    cfg = TrainConfig(select="blade", select_opt=opts)
    assert cfg.select_opt == {"betas": [0.9, 0.95]} and cfg.select_opt is not opts  # as its JSON reads back
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_unknown_keys_and_bad_json_are_job_errors_naming_them(cls):
    with pytest.raises(JobError, match=f"{cls.__name__}: unknown field.*'typo_field'"):
        cls.from_dict({**REQUIRED[cls], "typo_field": 1})
    with pytest.raises(JobError, match="not valid JSON"):
        cls.from_json("{'single': 'quotes'}")
    with pytest.raises(TypeError, match="needs a dict, got list"):
        cls.from_json("[1, 2]")  # JSON text, not a file called '[1, 2]'


@pytest.mark.parametrize("cls, field, value", [
    (TrainConfig, "steps", 3.0), (TrainConfig, "lr", "fast"), (TrainConfig, "resume", 1),
    (TrainConfig, "select_opt", None), (TrainConfig, "nproc", True), (TrainConfig, "corpus", None),
    (ScoreConfig, "opt", [1]), (ScoreConfig, "shard_size", "10"), (SelectConfig, "fraction", "0.2"),
    (DemoConfig, "quick", "yes"), (DemoConfig, "steps", 1.5)])
def test_wrong_types_name_the_field_at_construction(cls, field, value):
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{**REQUIRED[cls], field: value})


def _train(tmp_path, **kw):
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"Document {i} about foxes."}) + "\n"
                                                   for i in range(30)))
    return TrainConfig(**{**dict(corpus=str(tmp_path / "corpus.jsonl"), val_every_nth=5, tokenizer="byte", seq_len=16,
                                 d_model=16, n_layers=1, n_heads=2, steps=2, rank=4, optimizer="adamw",
                                 no_progress=True, no_plot=True, out=str(tmp_path / "out")), **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(threads=0), "--threads must be >= 1"), (dict(threads=-1), "--threads must be >= 1"),
    (dict(timeout=0.0), "--timeout must be a positive number"),
    (dict(weight_decay=float("nan")), "--weight-decay must be >= 0, got nan"),
    (dict(corpus="embedded", embedded_size="big"), "--embedded-size must be quick, default or a number"),
    (dict(model="huge", d_model=None, n_layers=None, n_heads=None), r"--model huge .*preset must be one of"),
    (dict(d_model=30, n_heads=4), r"--model tiny \(--d-model/--n-layers/--n-heads\): .*multiple of n_heads"),
    (dict(optimizer="lordo", compression="zip"), "--optimizer lordo rejects its options: compression"),
    (dict(optimizer="sparseloco", topk=0), "--optimizer sparseloco rejects its options: k must be >= 1"),
    (dict(optimizer="lordo", omega=2.0), "--optimizer lordo rejects its options: omega"),
    (dict(select="random", select_opt={"gama": 0.5}), "--select random rejects --select-opt: .*'gama'"),
    (dict(select="blade", select_opt={"tau": 0}), "--select blade rejects --select-opt: tau"),
    (dict(select="nosuch"), "--select must be one of blade"),
    (dict(steps=0), "--steps must be >= 1, got 0"),
])
def test_train_values_out_of_range_are_job_errors_before_anything_is_written(tmp_path, kw, message):
    cfg = _train(tmp_path, **kw)
    with pytest.raises(JobError, match=message):
        cfg.validate()
    with pytest.raises(JobError, match=message):
        TrainJob(cfg).run()
    assert not (tmp_path / "out").exists()


def test_a_data_cache_that_is_a_file_is_named(tmp_path):
    (tmp_path / "cache").write_text("mine")
    with pytest.raises(JobError, match="--data-cache .* exists and is not a folder"):
        TrainJob(_train(tmp_path, data_cache=str(tmp_path / "cache"))).run()
    assert (tmp_path / "cache").read_text() == "mine" and not (tmp_path / "out").exists()


def test_a_registered_online_selector_is_accepted(tmp_path, monkeypatch):
    from thresher.selection.online import RandomSelector
    from thresher.selection.registry import ONLINE

    monkeypatch.setattr(ONLINE, "_classes", dict(ONLINE._classes))  # undone after the test

    @ONLINE.register("my-random")
    class MyRandom(RandomSelector):
        pass

    summary = TrainJob(_train(tmp_path, select="my-random", select_opt={"gamma": 0.5})).run()
    assert summary["steps"] == 2


def _score(tmp_path, **kw):
    return ScoreConfig(**{**dict(method="random", pool=str(tmp_path / "pool.jsonl"),
                                 target=str(tmp_path / "pool.jsonl"), out=str(tmp_path / "out"),
                                 tokenizer="byte", seq_len=16, no_progress=True), **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(lr=-1.0), "--lr must be a positive number"), (dict(steps=-1), "--steps must be >= 0"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(model="huge"), "--model must be a preset or a local HF folder: preset must be one of"),
    (dict(pool="embedded", target="embedded", embedded_size="big"), "--embedded-size must be quick"),
    (dict(pool="embedded", target="embedded", embedded_size=10, corpus_seed=-1), "--corpus-seed must be >= 0"),
    (dict(seq_len=1), "--seq-len must be >= 2"), (dict(method="nosuch"), "--method must be one of"),
])
def test_score_values_out_of_range_are_job_errors_before_anything_is_written(tmp_path, kw, message):
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 9}) + "\n" for i in range(5)))
    with pytest.raises(JobError, match=message):
        ScoreJob(_score(tmp_path, **kw)).run()
    assert not (tmp_path / "out").exists()  # no run recorded with settings that cannot work


@pytest.mark.parametrize("kw, message", [
    (dict(strategy="gumbel", temperature=-1.0), "--temperature must be a finite number >= 0"),
    (dict(strategy="gumbel", temperature=float("nan")), "--temperature must be a finite number >= 0"),
    (dict(strategy="threshold", threshold=float("nan")), "--threshold must be a number, got nan"),
    (dict(strategy="gumbel", seed=-1), "--seed must be >= 0"), (dict(fraction=1.5), "--fraction must be in"),
])
def test_select_values_out_of_range_are_job_errors(tmp_path, kw, message):
    cfg = SelectConfig(**{**dict(scores=str(tmp_path), out=str(tmp_path / "sel.jsonl"), fraction=0.5), **kw})
    with pytest.raises(JobError, match=message):
        SelectJob(cfg).run()


@pytest.mark.parametrize("kw, message", [
    (dict(seed=-1), "--seed must be >= 0"), (dict(fraction=0.0), "--fraction must be in"),
    (dict(nproc=0), "--nproc must be >= 1"), (dict(pool="nope.jsonl", target="t.jsonl"), "--pool 'nope.jsonl'"),
])
def test_demo_values_out_of_range_are_job_errors_before_anything_is_written(tmp_path, kw, message):
    with pytest.raises(JobError, match=message):
        DemoJob(DemoConfig(**{**dict(out=str(tmp_path / "demo")), **kw})).run()
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_the_command_and_the_config_agree_on_every_field_and_default(cls):
    import importlib

    command = importlib.import_module(f"thresher.cli.{cls.__name__[:-6].lower()}")
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    flags = {a.dest for a in p._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(cls)}  # a flag per field, a field per flag
    argv = [x for k, v in REQUIRED[cls].items() for x in (f"--{k}", v)]
    from_flags = getattr(command, "config_from_args", cls.from_namespace)(p.parse_args(argv))
    assert from_flags == cls(**REQUIRED[cls])


def test_importing_the_api_has_no_side_effects(tmp_path):
    import subprocess
    import sys

    code = ("import os, sys; env = dict(os.environ)\n"
            "import thresher.jobs\n"
            "from thresher.jobs import JobConfig, JobError, TrainConfig, TrainJob, DemoConfig, DemoJob\n"
            "assert 'torch' not in sys.modules, 'the configs imported torch'\n"
            "from thresher.jobs import ScoreConfig, ScoreJob, SelectConfig, SelectJob\n"
            "assert dict(os.environ) == env and not os.listdir('.')\n"
            "print('OK')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr
