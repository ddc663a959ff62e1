"""TrainJob from Python (thresher.jobs.train): a config built in code, its JSON round trip,
resume, and parts (model / optimizer / selector) given as instances or factories. A
microscopic GPT on a small text file with the byte tokenizer keeps each run to seconds."""
from __future__ import annotations

import json

import pytest
import torch

from thresher.jobs import JobError, TrainConfig, TrainJob

TEXT = "\n\n".join(f"Paragraph {i}: a fox jumps over {i % 7} lazy dogs, and counts bytes."
                   for i in range(60))


def config(tmp_path, **kw) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    base = dict(corpus=str(corpus), tokenizer="byte", seq_len=16, d_model=16, n_layers=1,
                n_heads=2, batch_size=2, eval_every=2, eval_samples=8, ckpt_every=2, rank=4,
                no_progress=True, no_plot=True, schedule="constant", warmup=0, val_every_nth=5,
                optimizer="adamw", steps=4, data_cache=str(tmp_path / "data"),
                out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def test_config_json_round_trip_and_defaults_match_the_cli(tmp_path):
    cfg = config(tmp_path, select="random", select_opt={"gamma": 0.5})
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg
    with pytest.raises(ValueError, match="unknown field.*'stpes'"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(TypeError, match="TrainConfig.steps must be int"):
        TrainConfig(steps="3")
    # the CLI's defaults are the config's
    import argparse

    from thresher.cli import train as train_cmd

    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    assert train_cmd.config_from_args(p.parse_args([])) == TrainConfig()


def test_train_from_python_writes_outputs_and_resumes(tmp_path):
    full = TrainJob(config(tmp_path, out=str(tmp_path / "a"))).run()
    half = config(tmp_path, steps=2, out=str(tmp_path / "b"))
    TrainJob(half).run()
    # the folder records the whole config; resuming needs resume=True
    assert TrainConfig.from_json(tmp_path / "b" / "config.json") == half
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        TrainJob(half.replace(steps=4)).run()
    resumed = TrainJob(half.replace(steps=4, resume=True)).run()
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["tokens"] == full["tokens"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 4
    a = torch.load(tmp_path / "a" / "ckpt" / "rank0.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt" / "rank0.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        TrainJob(config(tmp_path, steps=0)).run()
    with pytest.raises(ValueError, match="--optimizer must be one of lordo"):
        TrainJob(config(tmp_path, optimizer="adam")).run()
    with pytest.raises(ValueError, match="--select-opt gamma=0.5 needs --select"):
        TrainJob(config(tmp_path, select_opt={"gamma": 0.5})).run()
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        TrainJob({"steps": 3})
    assert not (tmp_path / "run").exists()  # nothing written for a bad config


def _gpt(vocab):
    from thresher.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))


def test_instances_and_factories_replace_the_named_parts(tmp_path):
    cfg = config(tmp_path)
    model = _gpt(cfg_vocab := 258)  # the byte tokenizer's vocabulary
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = TrainJob(cfg, model=model, optimizer=opt).run()
    assert s["steps"] == 4 and s["comm_bytes_per_rank"] == 0  # a torch optimizer sends nothing
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # trained in place

    seen = {}

    def make_model(c, vocab):
        seen["vocab"] = vocab
        return _gpt(vocab)

    def make_selector(c, m, val):
        from thresher.selection.online import build_online_selector

        seen["selector"] = True
        return build_online_selector("random", m, val, gamma=0.5)

    s = TrainJob(config(tmp_path, out=str(tmp_path / "f")), model=make_model,
                 selector=make_selector).run()
    assert seen == {"vocab": cfg_vocab, "selector": True} and s["steps"] == 4


def test_an_instance_cannot_go_to_spawned_ranks(tmp_path):
    cfg = config(tmp_path, nproc=2)
    with pytest.raises(JobError, match="model: an instance cannot be sent to 2 spawned ranks"):
        TrainJob(cfg, model=_gpt(258)).run()
