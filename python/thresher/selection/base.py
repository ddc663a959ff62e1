"""The ``Scorer`` interface, the method registry and the helpers every scorer shares:
model construction, short LM training runs, batched per-sample losses and atomic checkpoints.

A scorer turns packed samples (``thresher.data.Samples``: anything with ``input_ids`` and
``labels`` ``(N, T)`` tensors, ``len()`` and ``samples[idx]``) into one float32 score per
sample, higher = keep. ``fit(pool, target)`` trains whatever models the method needs;
``score(samples)`` is batched and never builds an autograd graph.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from thresher.core.checks import check_int
from thresher.core.files import atomic_open
from thresher.models.gpt import GPT, GPTConfig, load_hf_causal_lm

from .registry import SCORERS

__all__ = [
    "Scorer",
    "build_scorer",
    "register_scorer",
    "available_methods",
    "make_lm",
    "train_lm",
    "per_sample_losses",
    "save_checkpoint",
    "load_checkpoint",
    "check_samples",
]

def register_scorer(name: str) -> Callable[[type], type]:
    """Class decorator: makes ``build_scorer(name, ...)`` build this Scorer subclass."""
    return SCORERS.register(name)


def available_methods() -> list[str]:
    return sorted(SCORERS.names())


def build_scorer(method: str, *, vocab_size: int, seed: int = 0, device="cpu", **options) -> "Scorer":
    """``method`` in ``available_methods()`` ("bliss", "color", "miniplm", "excess", "loss",
    "random", "qurating"); ``options`` are the method's hyper-parameters (see its class)."""
    cls = SCORERS.get(method, "method")  # a ValueError naming the methods
    check_int("vocab_size", vocab_size, 2)
    return cls(vocab_size=vocab_size, seed=seed, device=device, **options)


# ----------------------------------------------------------------------------------------
# Samples, checkpoints
# ----------------------------------------------------------------------------------------


def check_samples(name: str, samples, *, min_len: int = 1):
    ids = getattr(samples, "input_ids", None)
    labels = getattr(samples, "labels", None)
    if not isinstance(ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a thresher.data.Samples (with input_ids and labels "
                        f"tensors), got {type(samples).__name__}")
    if ids.dim() != 2 or labels.shape != ids.shape:
        raise ValueError(f"{name}.input_ids and {name}.labels must both be (N, T), got "
                         f"{tuple(ids.shape)} and {tuple(labels.shape)}")
    if ids.size(0) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} sample(s), got {ids.size(0)}")
    return ids, labels


def save_checkpoint(obj, path) -> None:
    """Atomic ``torch.save`` (temp file beside ``path``, fsync, rename: a crash leaves the
    old or the new checkpoint, never half of one)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        return None
    # our own files; they hold optimizer states and RNG byte tensors (plain containers)
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def make_lm(spec, *, vocab_size: int, seq_len: int, seed: int, device="cpu") -> nn.Module:
    """``spec``: a preset name ("tiny", "small", "base"), a dict of ``GPTConfig`` fields,
    a ``GPTConfig``, a local HF model directory, or an ``nn.Module`` with the loss API
    (deep-copied, so a scorer never trains the caller's model)."""
    if isinstance(spec, nn.Module):
        if not hasattr(spec, "sample_losses"):
            raise TypeError("a model given to a scorer must have the thresher loss API "
                            "(thresher.models.GPT or load_hf_causal_lm(...))")
        return copy.deepcopy(spec).to(device)
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(str(spec)):
        return load_hf_causal_lm(spec, device=device)
    if isinstance(spec, str):
        cfg = GPTConfig.preset(spec, vocab_size, max_seq_len=max(seq_len, 2))
    elif isinstance(spec, dict):
        cfg = GPTConfig(vocab_size=vocab_size, **{"max_seq_len": max(seq_len, 2), **spec})
    elif isinstance(spec, GPTConfig):
        cfg = spec
    else:
        raise TypeError(f"model must be a preset name, a dict of GPTConfig fields, a GPTConfig, "
                        f"a HF model directory or an nn.Module, got {type(spec).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg).to(device)


def make_adamw(params, *, lr, betas=(0.9, 0.95), weight_decay=0.1):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def train_lm(model: nn.Module, samples, *, steps: int, batch_size: int = 16, lr: float = 1e-3,
             weight_decay: float = 0.1, seed: int = 0, clip: float = 1.0, progress: bool = False,
             desc: str = "train", device=None) -> nn.Module:
    """``steps`` AdamW steps on uniformly drawn batches (seeded generator, so two calls with
    the same arguments train identically) with the fused weighted-CE loss; linear warm-up
    over the first 10% of steps, then constant. Returns ``model`` (trained in place)."""
    from tqdm.auto import tqdm

    ids, labels = check_samples("samples", samples)
    device = device or next(model.parameters()).device
    if steps <= 0:
        return model
    gen = torch.Generator().manual_seed(seed)
    opt = make_adamw(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, ids.size(0), (min(batch_size, ids.size(0)),), generator=gen)
        loss = model.loss(ids[idx].to(device), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def per_sample_losses(model: nn.Module, samples, *, batch_size: int = 64, progress: bool = False,
                      desc: str = "score") -> np.ndarray:
    """Token-mean next-token loss of every sample (``reduction="sample"`` of the fused op),
    float32 ``(N,)``. No graph: memory is one batch of activations."""
    from tqdm.auto import tqdm

    ids, labels = check_samples("samples", samples, min_len=0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(ids.size(0), dtype=np.float32)
    for s in tqdm(range(0, ids.size(0), batch_size), desc=desc, disable=not progress, leave=False):
        e = min(ids.size(0), s + batch_size)
        out[s:e] = model.sample_losses(ids[s:e].to(device), labels[s:e].to(device)).float().cpu().numpy()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------


class Scorer:
    """Base class. Subclasses implement ``_fit(pool, target, progress)`` (may call
    ``self._phase`` to checkpoint each trained model) and ``_score(samples, batch_size,
    progress) -> np.ndarray``. Options common to the LM-based methods:

    - ``model``: proxy architecture (preset name, dict of ``GPTConfig`` fields, HF dir, module)
    - ``steps``/``batch_size``/``lr``/``weight_decay``: the short training runs
    """

    method = "base"

    def __init__(self, *, vocab_size: int, seed: int = 0, device="cpu", **options):
        self.vocab_size, self.seed, self.device = vocab_size, seed, torch.device(device)
        self.options = dict(options)
        self._fitted = False
        self._ckpt_dir = None
        self._resume = False

    def _opt(self, name, default):
        return self.options.get(name, default)

    def _check_options(self, allowed):
        bad = sorted(set(self.options) - set(allowed))
        if bad:
            raise ValueError(f"unknown option(s) {bad} for method {self.method!r}; "
                             f"expected some of {sorted(allowed)}")

    def fit(self, pool, target, *, checkpoint_dir=None, resume: bool = False,
            progress: bool = True) -> "Scorer":
        check_samples("pool", pool)
        check_samples("target", target)
        self._ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._resume = bool(resume)
        self._fit(pool, target, progress)
        self._fitted = True
        return self

    def score(self, samples, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        check_samples("samples", samples, min_len=0)
        check_int("batch_size", batch_size, 1)
        return np.ascontiguousarray(self._score(samples, batch_size, progress), dtype=np.float32)

    # -- helpers for subclasses -------------------------------------------------------------

    def _phase(self, name: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], None]):
        """Builds a model and trains it, or (resume) loads its trained weights from the
        checkpoint a previous run wrote after this phase."""
        model = build()
        path = self._ckpt_dir / f"{name}.pt" if self._ckpt_dir is not None else None
        state = load_checkpoint(path) if (path is not None and self._resume) else None
        if state is not None:
            model.load_state_dict(state)
        else:
            train(model)
            if path is not None:
                save_checkpoint(model.state_dict(), path)
        model.eval()
        return model

    def _lm(self, spec, seq_len, seed_offset=0):
        return make_lm(spec, vocab_size=self.vocab_size, seq_len=seq_len,
                       seed=self.seed + seed_offset, device=self.device)

    def _train(self, model, samples, steps, progress, desc, seed_offset=0, lr=None):
        return train_lm(model, samples, steps=steps, batch_size=self._opt("batch_size", 16),
                        lr=lr if lr is not None else self._opt("lr", 1e-3),
                        weight_decay=self._opt("weight_decay", 0.1),
                        seed=self.seed + seed_offset, progress=progress, desc=desc,
                        device=self.device)

    def _fit(self, pool, target, progress):  # pragma: no cover - abstract
        raise NotImplementedError

    def _score(self, samples, batch_size, progress):  # pragma: no cover - abstract
        raise NotImplementedError
