"""JobConfig, the base of every job's config: JSON round trip, unknown keys, type checks,
filling from parsed CLI flags."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from thresher.jobs import JobConfig


@dataclasses.dataclass
class Example(JobConfig):
    corpus: str = "embedded"
    steps: int = 10
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    val_corpus: str | None = None
    resume: bool = False
    options: dict = dataclasses.field(default_factory=dict)


def test_json_round_trip_keeps_every_field_and_type(tmp_path):
    cfg = Example(corpus="pool.jsonl", steps=3, lr=2, betas=(0.8, 0.99), val_corpus="v.jsonl",
                  resume=True, options={"gamma": 0.5})
    assert cfg.lr == 2.0 and type(cfg.lr) is float  # an int given for a float field
    back = Example.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.betas, tuple)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert Example.from_json(path) == cfg
    assert json.loads(path.read_text())["betas"] == [0.8, 0.99]
    assert Example.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'stepz'"):
        Example.from_dict({"stepz": 3})


@pytest.mark.parametrize("field, value", [("steps", "3"), ("steps", True), ("lr", "fast"),
                                          ("corpus", 3), ("resume", 1), ("betas", 0.9)])
def test_wrong_type_names_the_field(field, value):
    with pytest.raises(TypeError, match=f"Example.{field} must be"):
        Example(**{field: value})


def test_bad_json_and_non_dict():
    with pytest.raises(ValueError, match="not valid JSON"):
        Example.from_json("{steps: 3}")
    with pytest.raises(TypeError, match="needs a dict"):
        Example.from_dict([1, 2])


def test_from_namespace_takes_the_flags_of_the_same_name():
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")  # not a field: ignored
    cfg = Example.from_namespace(p.parse_args(["--steps", "7", "--corpus", "c.txt"]))
    assert (cfg.corpus, cfg.steps, cfg.lr) == ("c.txt", 7, 1e-3)
    assert cfg.replace(steps=8).steps == 8 and cfg.steps == 7
