"""Tiny random-init HF causal LMs built from configs (no downloads), one per architecture
family the integration is tested on, and a one-thread fixture (tiny models run faster on one
thread of a loaded machine)."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration tests need "
                                   "transformers (pip install 'thresher[hf]')")

V, H = 97, 32
_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4)

# family -> (config class, overrides); each adds something the fused loss must reproduce
ARCHS = {
    "llama": ("LlamaConfig", dict(intermediate_size=48, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(intermediate_size=48, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=48, num_key_value_heads=2,
                                  tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(intermediate_size=48, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=3.0)),  # soft-capping (tied)
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0)),               # tied
    "gpt_neox": ("GPTNeoXConfig", dict(intermediate_size=48)),
    "phi": ("PhiConfig", dict(intermediate_size=48)),                 # LM head with a bias
    "opt": ("OPTConfig", dict(ffn_dim=48, word_embed_proj_dim=H)),    # tied
    "cohere": ("CohereConfig", dict(intermediate_size=48, num_key_value_heads=2,
                                    logit_scale=0.3, eos_token_id=0)),  # logit scale (tied)
    "granite": ("GraniteConfig", dict(intermediate_size=48, num_key_value_heads=2,
                                      logits_scaling=4.0)),           # logits / scaling
}


def tiny_config(arch: str):
    cls_name, over = ARCHS[arch]
    common = dict(vocab_size=V) if arch == "gpt2" else _COMMON  # GPT-2 names its sizes n_*
    return getattr(transformers, cls_name)(**common, **over)


def tiny_model(arch: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = "eager"  # deterministic, float64-capable everywhere
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    # random biases and norms so a dropped term cannot hide behind zero/one initialisation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
