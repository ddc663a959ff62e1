"""The random-number state a resumed run restores: torch's CPU generator and, when CUDA
is initialised, every CUDA device's."""
from __future__ import annotations

import torch


def rng_state() -> dict:
    """torch's CPU (and, when present, CUDA) generator states, as uint8 tensors."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
