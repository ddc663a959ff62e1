"""A small llama-style GPT (RMSNorm, RoPE, SwiGLU, optional tied embeddings), the BLISS score
model built on it, and an adapter giving any HF causal LM the same loss API.

Every model here exposes ``forward(input_ids) -> hidden (B, T, d)`` (after the final norm),
``lm_weight``/``lm_bias`` (the LM head) and, through :class:`CausalLMLoss`, ``loss(input_ids,
labels=None, *, reduction, sample_weight, token_weight, backend="auto")`` and
``sample_losses``. The loss goes through the fused ``thresher.ops.linear_weighted_cross_entropy``
and never builds the ``(B*T, V)`` logits, except with ``backend="torch"``: the composable
path ``torch.func`` transforms need (BLISS's forward-mode JVPs; why and what it costs:
docs/algorithms.md §1, "Why backend='torch'").
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thresher.ops import linear_weighted_cross_entropy
from thresher.core.checks import (
    IGNORE_INDEX,
    check_choice,
    check_finite_range,
    check_int,
    check_optional_int,
    check_tensor,
)

__all__ = [
    "GPTConfig",
    "GPT",
    "ScoreModel",
    "CausalLMLoss",
    "HFCausalLM",
    "load_hf_causal_lm",
]

# name -> (d_model, n_layers, n_heads). Non-embedding parameters ~ 12 d^2 per layer
# (4 d^2 attention + 3 d * d_ff SwiGLU with d_ff ~ 8/3 d): tiny 0.8M, small 10.6M, base 85M,
# plus V*d for the (tied) embedding (4096 x 128 = 0.5M for tiny).
_PRESETS = {
    "tiny": (128, 4, 4),
    "small": (384, 6, 6),
    "base": (768, 12, 12),
}


@dataclass
class GPTConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            setattr(self, name, check_int(f"GPTConfig.{name}", getattr(self, name), 1))
        self.d_ff = check_optional_int("GPTConfig.d_ff", self.d_ff, 1)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be a multiple of n_heads "
                f"({self.n_heads}) with an even head size (RoPE rotates pairs)")
        if self.d_ff is None:
            # llama's rule: 2/3 of 4d, rounded up to a multiple of 8
            self.d_ff = 8 * math.ceil(8 * self.d_model / 3 / 8)
        check_finite_range("GPTConfig.dropout", self.dropout, 0.0, 1.0, hi_open=True)

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "GPTConfig":
        """``"tiny"`` (~1M parameters at V=4096), ``"small"`` (~10M), ``"base"`` (~100M)."""
        check_choice("preset", name, tuple(_PRESETS))
        d, n_layers, n_heads = _PRESETS[name]
        return cls(vocab_size=vocab_size, d_model=d, n_layers=n_layers, n_heads=n_heads,
                   **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# The loss (shared by GPT and the HF adapter)
# ----------------------------------------------------------------------------------------


def logit_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` of a HF config's final-logit post-processing (1.0 and None when
    the family has none): Cohere's ``logit_scale``, Granite's ``logits_scaling`` and Gemma's
    ``final_logit_softcapping``, read from the text config of multimodal models."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:      # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:   # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (None if softcap is None else float(softcap))


def math_attention():
    """A context in which attention runs PyTorch's math kernel, the one with a double
    backward (BLISS differentiates through the proxy model's gradient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class CausalLMLoss:
    """Mixin: next-token loss for any module with ``forward(input_ids) -> hidden`` and
    ``lm_weight``/``lm_bias`` properties."""

    def loss(self, input_ids: Tensor, labels: Tensor | None = None, *, reduction: str = "mean",
             sample_weight: Tensor | None = None, token_weight: Tensor | None = None,
             backend: str = "auto") -> Tensor:
        """Predicts ``labels[:, 1:]`` from positions ``[:, :-1]`` (``labels`` defaults to
        ``input_ids``; -100 is ignored). ``token_weight`` is aligned with ``labels``,
        ``(B, T)`` (its first column, which no position predicts, is dropped), or already
        shifted, ``(B, T-1)``. ``backend``: any of ``thresher.ops``' backends; ``"torch"``
        (the op's composable backend) for ``torch.func`` transforms."""
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        if input_ids.size(1) < 2:
            raise ValueError(f"input_ids must have at least 2 positions, got shape "
                             f"{tuple(input_ids.shape)}")
        if labels is None:
            labels = input_ids
        check_tensor("labels", labels, shape=tuple(input_ids.shape),
                     dtypes=(torch.int64, torch.int32))
        B, T = input_ids.shape
        target = labels[:, 1:]
        if token_weight is not None:
            check_tensor("token_weight", token_weight, ndim=2)
            if tuple(token_weight.shape) == (B, T):
                token_weight = token_weight[:, 1:]
            elif tuple(token_weight.shape) != (B, T - 1):
                raise ValueError(f"token_weight must have shape ({B}, {T}) or ({B}, {T - 1}), "
                                 f"got {tuple(token_weight.shape)}")
        with math_attention() if backend == "torch" else contextlib.nullcontext():
            hidden = self(input_ids)[:, :-1]
        # final-logit post-processing of the model family (HF models: logit scale, soft-cap);
        # a scale folds into hidden and bias: scale * (h W^T + b) = (scale h) W^T + scale b
        scale, softcap = getattr(self, "logit_transform", (1.0, None))
        bias = self.lm_bias
        if scale != 1.0:
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
        return linear_weighted_cross_entropy(
            hidden, self.lm_weight, target.contiguous(), bias=bias, softcap=softcap,
            sample_weight=sample_weight,
            token_weight=None if token_weight is None else token_weight.contiguous(),
            reduction=reduction, backend=backend)

    @torch.no_grad()
    def sample_losses(self, input_ids: Tensor, labels: Tensor | None = None, *,
                      backend: str = "auto") -> Tensor:
        """Token-mean next-token loss of each sequence, ``(B,)`` float32, no graph."""
        return self.loss(input_ids, labels, reduction="sample", backend=backend)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n


# ----------------------------------------------------------------------------------------
# The GPT
# ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)  # rotate-half layout: pairs (i, i + head_dim/2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd). Rotates the pairs (x_i, x_{i+hd/2}) by the
    position's angle, so q.k depends only on the positions' difference."""
    half = x.size(-1) // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(CausalLMLoss, nn.Module):
    """Llama-style decoder. ``forward(input_ids)`` returns the final-normed hidden states;
    the LM head is applied inside :meth:`loss` by the fused op."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.lm_head = None if config.tie_embeddings else nn.Linear(
            config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.d_model // config.n_heads, config.max_seq_len,
                               config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(
                    ("proj.weight", "down.weight")) else std
                nn.init.normal_(p, 0.0, s)

    @property
    def lm_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def lm_bias(self):
        return None

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids has {T} positions, more than max_seq_len="
                             f"{self.config.max_seq_len}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.norm(x)


class ScoreModel(nn.Module):
    """BLISS score model: a GPT backbone, mean pooling over the non-pad tokens
    (``labels != -100``; all tokens when ``labels`` is None), ``Linear(d, 1)``, sigmoid."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.backbone = GPT(config)
        self.head = nn.Linear(config.d_model, 1)
        # zero head: every sample starts at s = 0.5 (uniform softmax weights), and the
        # first hypergradients move the head before the backbone.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_backbone(cls, gpt: GPT) -> "ScoreModel":
        m = cls(gpt.config)
        m.backbone.load_state_dict(gpt.state_dict())
        return m.to(next(gpt.parameters()).device)

    def logits(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.backbone(input_ids)
        if labels is None:
            pooled = h.mean(1)
        else:
            m = (labels != IGNORE_INDEX).to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled).squeeze(-1)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.logits(input_ids, labels))


# ----------------------------------------------------------------------------------------
# HF adapter
# ----------------------------------------------------------------------------------------


class HFCausalLM(CausalLMLoss, nn.Module):
    """Wraps a ``transformers`` causal LM: ``forward`` returns the base model's last hidden
    state (after its final norm), the LM head is the model's output embedding; the family's
    final-logit post-processing (Gemma's soft-cap, Cohere/Granite logit scaling) is read from
    the config as ``thresher.integrations.apply_thresher`` does. No attention mask is passed: padding sits only at the tail of a sample (``pack``), and
    causal attention keeps it from affecting real tokens."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        head = hf_model.get_output_embeddings()
        if head is None:
            raise ValueError("hf_model has no output embeddings: not a causal LM")
        self._head = head
        self.logit_transform = logit_transform(hf_model.config)

    @property
    def config(self):
        return self.hf.config

    @property
    def lm_weight(self) -> Tensor:
        return self._head.weight

    @property
    def lm_bias(self):
        return getattr(self._head, "bias", None)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hf.base_model(input_ids=input_ids).last_hidden_state


def load_hf_causal_lm(path, *, dtype: torch.dtype = torch.float32, device="cpu") -> HFCausalLM:
    """Loads a HF causal LM from a local directory (offline) behind the loss API."""
    import os

    if not os.path.isdir(str(path)):
        raise ValueError(f"path must be a local directory holding a HF model, got {path!r}")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return HFCausalLM(hf.to(device).eval())
