"""thresher.models: the small llama-style GPT, the BLISS score model, and adapters for HF causal LMs."""
from .gpt import GPT, GPTConfig, HFCausalLM, ScoreModel, load_hf_causal_lm, torch_linear_cross_entropy

__all__ = ["GPT", "GPTConfig", "ScoreModel", "HFCausalLM", "load_hf_causal_lm",
           "torch_linear_cross_entropy"]
