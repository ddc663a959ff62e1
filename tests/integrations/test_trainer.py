"""ThresherTrainer: selection through the patched forward (exact under gradient
accumulation), thresher optimizers, no DDP wrapper for LoRDO under a 2-process torchrun
(gloo), and bit-identical resume from the Trainer's own checkpoints."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thresher.optim import LoRDO

from .conftest import tiny_model

pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pip install "
                    "'thresher[hf]')")
from transformers import TrainingArguments  # noqa: E402

from thresher.integrations.trainer import ThresherTrainer  # noqa: E402

WORKER = Path(__file__).with_name("_trainer_worker.py")


def _launch(out, steps, *extra, procs=1, port=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                "--master_port", str(port)] if procs > 1 else [sys.executable]
    proc = subprocess.run(launcher + [str(WORKER), str(out), str(steps), *extra], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(Path(out) / f"traj_rank{r}.pt") for r in range(procs)]


def _free_port():
    from thresher.comm.collectives import free_port

    return free_port()


def test_single_process_blade_lowrank_adam_resume_is_bit_identical(tmp_path):
    (full,) = _launch(tmp_path / "a", 8, "--selector", "blade", "--optim", "lowrank")
    assert full["losses"][-1] < full["losses"][0] - 0.1, full["losses"]
    (resumed,) = _launch(tmp_path / "b", 8, "--selector", "blade", "--optim", "lowrank",
                         "--resume", str(tmp_path / "a" / "checkpoint-4"))
    assert len(resumed["params"]) == 4
    for step, (x, y) in enumerate(zip(full["params"][4:], resumed["params"]), start=5):
        assert torch.equal(x, y), f"step {step} differs after resume"


@pytest.mark.parametrize("selector", [None, "blade"])
def test_torchrun_lordo_two_ranks(tmp_path, selector):
    extra = [] if selector is None else ["--selector", selector]
    full = _launch(tmp_path / "a", 8, *extra, procs=2, port=_free_port())
    r0, r1 = full
    assert r0["wrapped"] == "LlamaForCausalLM", "LoRDO's model must not be wrapped in DDP"
    assert r0["losses"][-1] < r0["losses"][0] - 0.1, r0["losses"]
    # sync_every=2: identical after every sync, different in between (own data, no DDP)
    for step, (x, y) in enumerate(zip(r0["params"], r1["params"]), start=1):
        if step % 2 == 0:
            assert torch.equal(x, y), f"ranks differ after the sync of step {step}"
        elif step > 1:  # step 1 runs at lr 0 (warm-up)
            assert not torch.equal(x, y), f"ranks identical after local step {step}"
    resumed = _launch(tmp_path / "b", 8, *extra, "--resume", str(tmp_path / "a" / "checkpoint-4"),
                      procs=2, port=_free_port())
    for rank in (0, 1):
        got, want = resumed[rank]["params"], full[rank]["params"][4:]
        assert len(got) == 4
        for step, (x, y) in enumerate(zip(want, got), start=5):
            assert torch.equal(x, y), f"rank {rank}, step {step} differs after resume"


def _trainer(tmp_path, **kw):
    model = tiny_model("llama", dtype=torch.float64).train()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    return ThresherTrainer(model, args, **kw), model


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_accumulation_window_is_the_weighted_mean(tmp_path, granularity):
    trainer, model = _trainer(tmp_path, selector="highloss",
                              selector_options=dict(gamma=0.5, granularity=granularity))
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(2):
        ids = torch.randint(0, 97, (4, 9), generator=g)
        labels = ids.clone()
        labels[i, 5:] = -100
        batches.append({"input_ids": ids, "labels": labels})
    got, count = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    key = "sample_weight" if granularity == "sequence" else "token_weight"
    assert all(key in b for b in got)
    window = sum(trainer.compute_loss(model, b, num_items_in_batch=count) for b in got)
    ids = torch.cat([b["input_ids"] for b in got])
    labels = torch.cat([b["labels"] for b in got])
    alpha = torch.cat([b[key] for b in got])
    want = model(input_ids=ids, labels=labels, **{key: alpha.double()}).loss
    torch.testing.assert_close(window, want, rtol=1e-12, atol=0)


def test_settings_that_would_wrap_lordo_are_refused(tmp_path):
    class TwoRanks(TrainingArguments):
        @property
        def world_size(self):
            return 2

    model = tiny_model("llama", dtype=torch.float32).train()
    args = TwoRanks(str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 4
    opt = LoRDO(model.parameters(), rank=2)
    trainer = ThresherTrainer(model, args, train_dataset=data, optimizers=(opt, None))
    with pytest.raises(ValueError, match="created before torch.distributed was initialised"):
        trainer.train()
    opt.dist.world = 2
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match=r"LoRDO does its own communication.*FSDP"):
        trainer.train()


def test_bad_selector_arguments(tmp_path):
    with pytest.raises(ValueError, match="name"):
        _trainer(tmp_path, selector="best")
    with pytest.raises(ValueError, match="without selector"):
        _trainer(tmp_path, selector_options=dict(gamma=0.5))


def test_evaluate_reports_hf_loss(tmp_path):
    model = tiny_model("cohere", dtype=torch.float32)
    data = [{"input_ids": x, "labels": x} for x in
            torch.randint(0, 97, (8, 12), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        want = torch.stack([model(input_ids=torch.stack([d["input_ids"] for d in data[i:i + 4]]),
                                  labels=torch.stack([d["labels"] for d in data[i:i + 4]])).loss
                            for i in (0, 4)]).mean()
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                             use_cpu=True)
    got = ThresherTrainer(model, args, eval_dataset=data).evaluate()["eval_loss"]
    assert abs(got - float(want)) < 1e-5


def test_resuming_without_thresher_state_is_an_error(tmp_path):
    trainer, _ = _trainer(tmp_path / "run", selector="random")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="thresher_rank0.pt"):
        trainer._load_optimizer_and_scheduler(str(tmp_path / "ckpt"))
