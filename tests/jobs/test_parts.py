"""TrainJob with the user's own model / optimizer / selector (instances and factories) in a
single process without torch.distributed, or in a process group the user initialised: what
works, and the misuse that must be refused before any work instead of training the wrong
thing silently."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from thresher.jobs import JobError, TrainConfig, TrainJob
from thresher.jobs.train import build_optimizer
from thresher.models.gpt import GPT, GPTConfig

BYTE_VOCAB = 258  # the byte tokenizer's vocabulary


def config(tmp_path, **kw) -> TrainConfig:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": f"Document {i}: foxes and dogs, {i % 5} times."}) + "\n"
                                  for i in range(40)))
    base = dict(corpus=str(corpus), tokenizer="byte", seq_len=16, d_model=16, n_layers=1, n_heads=2,
                batch_size=2, eval_every=2, eval_samples=8, rank=4, val_every_nth=5, steps=2,
                optimizer="adamw", no_progress=True, no_plot=True, out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=BYTE_VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))


def test_your_model_and_optimizer_train_in_this_process(tmp_path):
    model = gpt()
    before = [p.detach().clone() for p in model.parameters()]
    threads = torch.get_num_threads()
    summary = TrainJob(config(tmp_path), model=model,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).run()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # trained in place
    assert summary["optimizer"] == "SGD"  # what trained, not the config's unused "adamw"
    assert summary["comm_bytes_per_rank"] == 0 and summary["optimizer_state_bytes"] is None
    assert not dist.is_initialized()  # one process, no process group made or left behind
    assert torch.get_num_threads() == threads  # the caller's torch settings are left as they were


def test_an_optimizer_instance_needs_the_model_it_was_built_on(tmp_path):
    other = gpt()
    with pytest.raises(JobError, match="optimizer: an instance needs the model it was built on"):
        TrainJob(config(tmp_path), optimizer=torch.optim.SGD(other.parameters(), lr=0.1)).run()
    with pytest.raises(JobError, match="optimizer: the instance holds parameters that are not the model's"):
        TrainJob(config(tmp_path), model=gpt(), optimizer=torch.optim.SGD(other.parameters(), lr=0.1)).run()
    assert not (tmp_path / "run").exists()


def test_a_selector_instance_needs_the_model_it_was_built_on(tmp_path):
    from thresher.selection.online import build_online_selector

    other = gpt()
    selector = build_online_selector("random", other, gamma=0.5)
    with pytest.raises(JobError, match="selector: an instance needs the model it was built on"):
        TrainJob(config(tmp_path), selector=selector).run()
    with pytest.raises(JobError, match="selector: the instance was built on another model"):
        TrainJob(config(tmp_path), model=gpt(), selector=selector).run()
    assert TrainJob(config(tmp_path), model=other, selector=selector).run()["steps"] == 2


def test_factories_run_on_spawned_ranks_and_must_pickle(tmp_path):
    # a module-level function pickles: build_optimizer is an optimizer(cfg, model) factory
    summary = TrainJob(config(tmp_path, nproc=2, threads=1, optimizer="lordo", sync_every=2),
                       optimizer=build_optimizer).run()
    assert summary["world"] == 2 and summary["comm_bytes_per_rank"] > 0
    with pytest.raises(JobError, match="optimizer: a factory for 2 spawned ranks must pickle"):
        TrainJob(config(tmp_path, nproc=2, out=str(tmp_path / "lambda")),
                 optimizer=lambda cfg, model: torch.optim.SGD(model.parameters(), lr=0.1)).run()
    assert not (tmp_path / "lambda").exists()


def test_a_process_group_you_initialised_is_used_and_kept(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = gpt()
        summary = TrainJob(config(tmp_path), model=model,
                           optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3)).run()
        assert summary["world"] == 1 and dist.is_initialized()  # not destroyed: it is yours
    finally:
        dist.destroy_process_group()
