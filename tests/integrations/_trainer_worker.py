"""One ThresherTrainer run on a tiny Llama, launched by the tests (directly or under torchrun):
``python _trainer_worker.py OUT MAX_STEPS [--resume CKPT] [--selector NAME] [--optim NAME]``.
Writes ``OUT/traj_rank{r}.pt``: the flat parameters after every optimizer step and the logged
losses."""
import argparse
import os
import sys

import torch
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import V, tiny_model  # noqa: E402

from thresher.integrations.trainer import ThresherTrainer  # noqa: E402
from thresher.optim import LoRDO, LowRankAdam  # noqa: E402

T = 16


class Patterns(torch.utils.data.Dataset):
    """Arithmetic token sequences (learnable, so the loss falls), some right-padded."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(T)) % V

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        if i % 4 == 0:
            labels[-5:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


class Trajectory(TrainerCallback):
    def __init__(self):
        self.params = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.params.append(torch.cat([p.detach().reshape(-1).clone()
                                      for p in model.parameters()]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("max_steps", type=int)
    ap.add_argument("--resume")
    ap.add_argument("--selector")
    ap.add_argument("--optim", default="lordo")
    ap.add_argument("--save-steps", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_model("llama", dtype=torch.float32).train()
    args = TrainingArguments(
        a.out, max_steps=a.max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="linear",
        warmup_steps=2, max_grad_norm=0.0, save_steps=a.save_steps, logging_steps=1,
        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    # after TrainingArguments, which initialises torch.distributed under torchrun
    if a.optim == "lordo":
        opt = LoRDO(model.parameters(), lr=1e-2, rank=4, sync_every=2)
    else:
        opt = LowRankAdam(model.parameters(), lr=3e-2, rank=4)
    sel = {} if a.selector is None else dict(
        selector=a.selector, val_data=Patterns(32, 1).ids,
        selector_options=dict(gamma=0.5, tau=3, ref_steps=1) if a.selector == "blade" else {})
    traj = Trajectory()
    trainer = ThresherTrainer(model, args, train_dataset=Patterns(256, 0),
                              optimizers=(opt, None), callbacks=[traj], **sel)
    trainer.train(resume_from_checkpoint=a.resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    torch.save({"params": traj.params, "losses": losses,
                "wrapped": type(trainer.model_wrapped).__name__},
               os.path.join(a.out, f"traj_rank{args.process_index}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        # a gloo group left for the interpreter's exit to tear down can abort a rank there
        # ("terminate called without an active exception", exit code -6): end it in order
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
