"""``ThresherTrainer``: the HF ``Trainer`` with thresher's fused loss, online data selection and
optimizers.

The model is patched with :func:`apply_thresher`; ``selector=`` scores every micro-batch of an
accumulation window and weights the loss with its ``alpha`` (gradient accumulation stays
exact); thresher's optimizers go in through ``optimizers=`` or ``optimizer_cls_and_kwargs``,
and one that communicates itself (a ``thresher.optim.DistMixin``) keeps the model out of
``DistributedDataParallel``; every rank checkpoints its selector and optimizer state in
``thresher_rank{r}.pt``. Details and limits: docs/integrations.md, "ThresherTrainer".
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.utils import logging

from thresher.core.constants import IGNORE_INDEX
from thresher.optim import DistMixin
from thresher.selection.online import OnlineSelector, build_online_selector
from thresher.selection.registry import ONLINE

from .transformers import ThresherLM, apply_thresher, is_thresher_patched

__all__ = ["ThresherTrainer", "STATE_FILE"]

STATE_FILE = "thresher_rank{rank}.pt"
logger = logging.get_logger(__name__)


def _inner_optimizer(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it


class ThresherTrainer(Trainer):
    """``ThresherTrainer(model, args, *, selector=None, val_data=None, selector_options=None,
    thresher_backend="auto", **trainer_kwargs)``. ``val_data`` (target-distribution samples)
    and ``selector_options`` (``gamma``, ``tau``, ``ref_steps``, ...) go to
    ``build_online_selector`` when ``selector`` is a name. Batches need ``input_ids`` and
    ``labels`` (right padding labelled -100, as ``DataCollatorForLanguageModeling`` does)."""

    def __init__(self, model=None, args=None, *, selector=None, val_data=None,
                 selector_options: dict | None = None, thresher_backend: str = "auto",
                 **kwargs):
        if model is None:
            raise ValueError("ThresherTrainer needs model= (a HF causal LM; model_init is not "
                             "supported)")
        if not is_thresher_patched(model):
            apply_thresher(model, backend=thresher_backend)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = True  # the patched forward takes num_items_in_batch
        self.selector = self._make_selector(selector, val_data, selector_options or {})

    # -- selection ---------------------------------------------------------------------------
    def _make_selector(self, selector, val_data, options) -> OnlineSelector | None:
        if selector is None:
            if val_data is not None or options:
                raise ValueError("val_data/selector_options were given without selector=")
            return None
        if isinstance(selector, OnlineSelector):
            if options:
                raise ValueError("selector_options only apply when selector is a name")
            return selector
        if not isinstance(selector, str):
            raise TypeError(f"selector must be one of {', '.join(ONLINE.names())} or an OnlineSelector, "
                            f"got {type(selector).__name__}")
        return build_online_selector(selector, ThresherLM(self.model), val_data, **options)

    def _weight_key(self) -> str:
        return "sample_weight" if self.selector.granularity == "sequence" else "token_weight"

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.selector is None or not batches:
            return batches, num_items
        key = self._weight_key()
        count = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            if "input_ids" not in batch or "labels" not in batch:
                raise ValueError("ThresherTrainer(selector=...) needs batches with input_ids and "
                                 f"labels, got keys {sorted(batch)}")
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            alpha = self.selector.select(ids, labels)
            batch[key] = alpha
            valid = labels != IGNORE_INDEX
            count += (valid[:, 1:].sum(1) * alpha).sum() if key == "sample_weight" \
                else (valid * alpha).sum()
        if num_items is None:
            return batches, None
        # the Trainer's count, weighted by alpha: the loss is the weighted mean of the window
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    # -- no DDP for optimizers that communicate themselves ------------------------------------
    def _communicates_itself(self) -> bool:
        if self.optimizer is not None:
            return isinstance(_inner_optimizer(self.optimizer), DistMixin)
        cls = (self.optimizer_cls_and_kwargs or (None,))[0]
        return isinstance(cls, type) and issubclass(cls, DistMixin)

    def _prepare_for_training(self, *args, **kwargs):
        if not self._communicates_itself() or self.args.world_size == 1:
            out = super()._prepare_for_training(*args, **kwargs)
            if self.args.world_size > 1 and self._communicates_itself():
                raise RuntimeError("the optimizer created by create_optimizer communicates "
                                   "itself but the model was wrapped for data parallelism; pass "
                                   "it as optimizers=(opt, None) or optimizer_cls_and_kwargs")
            return out
        name = type(_inner_optimizer(self.optimizer)).__name__ if self.optimizer is not None \
            else self.optimizer_cls_and_kwargs[0].__name__
        wrappers = [what for what, on in (
            ("DeepSpeed (args.deepspeed)", self.is_deepspeed_enabled),
            ("FSDP (args.fsdp)", self.is_fsdp_enabled),
            (f"DataParallel over {self.args.n_gpu} GPUs in one process", self.args.n_gpu > 1))
            if on]
        opt = None if self.optimizer is None else _inner_optimizer(self.optimizer)
        if opt is not None and opt.dist.world != self.args.world_size:
            raise ValueError(f"{name} sees a world of {opt.dist.world} process(es) but the Trainer "
                             f"runs {self.args.world_size}: it was created before "
                             "torch.distributed was initialised; create it after "
                             "TrainingArguments(...) (which initialises it under torchrun) or "
                             "pass optimizer_cls_and_kwargs")
        if wrappers:
            raise ValueError(f"{name} does its own communication, so the model must not be "
                             f"wrapped for data parallelism, but these settings would: "
                             f"{', '.join(wrappers)}. Run one process per device (torchrun) "
                             "without them.")
        logger.warning_once(f"ThresherTrainer: {name} does its own communication; the model is "
                            "not wrapped in DistributedDataParallel (each rank trains its own "
                            "copy on its shard of the data)")
        from accelerate.utils import DistributedType

        state = self.accelerator.state
        saved = state.distributed_type
        state.distributed_type = DistributedType.NO  # accelerate.prepare: no DDP wrapper
        try:
            return super()._prepare_for_training(*args, **kwargs)
        finally:
            state.distributed_type = saved

    # -- checkpoints ---------------------------------------------------------------------------
    def _state_path(self, directory: str) -> str:
        return os.path.join(directory, STATE_FILE.format(rank=self.args.process_index))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {}
        if self.selector is not None:
            state["selector"] = self.selector.state_dict()
        if self._communicates_itself():
            state["optimizer"] = self.optimizer.state_dict()
            if self.args.world_size > 1:
                state["model"] = self.model.state_dict()
        if state:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(state, self._state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = self._state_path(checkpoint)
        needed = self.selector is not None or self._communicates_itself()
        if not os.path.isfile(path):
            if needed:
                raise FileNotFoundError(f"resume_from_checkpoint={checkpoint!r} has no {path}: "
                                        "it was not written by a ThresherTrainer with this "
                                        "selector/optimizer and world size")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in state:
            self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.selector is not None:
            if "selector" not in state:
                raise ValueError(f"{path} holds no selector state, but selector= is set")
            self.selector.load_state_dict(state["selector"])
