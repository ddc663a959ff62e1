"""thresher.integrations: Hugging Face ``transformers`` (``apply_thresher``, ``ThresherLM``) and
its ``Trainer`` (``thresher.integrations.trainer.ThresherTrainer``). ``transformers`` and
``accelerate`` are optional: ``pip install "thresher[hf]"``."""
from .transformers import (
    LOSS_REDUCTIONS,
    ThresherLM,
    apply_thresher,
    is_thresher_patched,
    logit_transform,
    remove_thresher,
)

__all__ = ["LOSS_REDUCTIONS", "ThresherLM", "apply_thresher", "is_thresher_patched",
           "logit_transform", "remove_thresher"]
