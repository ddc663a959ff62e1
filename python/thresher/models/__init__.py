"""thresher.models: the small llama-style GPT, the BLISS score model, and adapters for HF causal LMs."""
