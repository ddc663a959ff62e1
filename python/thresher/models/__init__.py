"""thresher.models: the small llama-style GPT, the BLISS score model, and adapters for HF causal LMs."""
from .gpt import GPT, GPTConfig, HFCausalLM, ScoreModel, load_hf_causal_lm

__all__ = ["GPT", "GPTConfig", "ScoreModel", "HFCausalLM", "load_hf_causal_lm"]
