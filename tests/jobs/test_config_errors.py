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
