"""GPT / ScoreModel / HF adapter: the loss equals a plain float64 F.cross_entropy, RoPE and
causality sanity, presets' sizes, torch.func compatibility of the "torch" loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thresher.models.gpt import GPT, GPTConfig, ScoreModel, apply_rope, load_hf_causal_lm, rope_tables

V, T, B = 37, 10, 3


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).double()


def plain_losses(model, ids, labels, sample_weight=None, token_weight=None):
    """Per-token losses and weights by hand: logits = h W^T, F.cross_entropy, shift by one."""
    h = model(ids)[:, :-1]
    logits = h @ model.lm_weight.t()
    tgt = labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100,
                          reduction="none").reshape(tgt.shape)
    tw = (tgt != -100).double()
    if token_weight is not None:
        tw = tw * token_weight[:, 1:]
    sw = torch.ones(ids.size(0), dtype=torch.float64) if sample_weight is None else sample_weight
    return tok, tw, sw


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_plain_cross_entropy(backend, weighted):
    m = small(tie_embeddings=backend != "torch")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, -4:] = -100
    labels[2, 3] = -100
    sw = torch.rand(B, generator=g, dtype=torch.float64) if weighted else None
    tw = torch.rand(B, T, generator=g, dtype=torch.float64) if weighted else None
    with torch.no_grad():
        tok, tw_, sw_ = plain_losses(m, ids, labels, sw, tw)
        w = tw_ * sw_[:, None]
        want = {
            "none": tok * w,
            "sample": (tok * tw_).sum(1) / tw_.sum(1) * sw_,
            "sum": (tok * w).sum(),
            "mean": (tok * w).sum() / w.sum(),
        }
        for red, ref in want.items():
            got = m.loss(ids, labels, reduction=red, sample_weight=sw, token_weight=tw,
                         backend=backend)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=red)
    # labels default to input_ids; sample_losses is the unweighted "sample" reduction, no graph
    sl = m.sample_losses(ids)
    assert not sl.requires_grad and sl.shape == (B,)
    tok, tw_, _ = plain_losses(m, ids, ids)
    torch.testing.assert_close(sl, ((tok * tw_).sum(1) / tw_.sum(1)).detach(), rtol=1e-10, atol=0)


def test_gradients_match_between_fused_and_torch_loss():
    m = small()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    g1 = torch.autograd.grad(m.loss(ids), list(m.parameters()))
    g2 = torch.autograd.grad(m.loss(ids, backend="torch"), list(m.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_torch_loss_is_twice_differentiable_and_func_compatible():
    m = small()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    params = list(m.parameters())
    g = torch.autograd.grad(m.loss(ids, backend="torch"), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(g, params, grad_outputs=v)
    # finite-difference check of the Hessian-vector product
    eps = 1e-6
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(eps * vi)
    gp = torch.autograd.grad(m.loss(ids, backend="torch"), params)
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.sub_(2 * eps * vi)
    gm = torch.autograd.grad(m.loss(ids, backend="torch"), params)
    for h, a, b in zip(hv, gp, gm):
        torch.testing.assert_close(h, (a - b) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_rope_is_relative_and_norm_preserving():
    hd = 8
    cos, sin = rope_tables(hd, 32, 10000.0)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)

    def at(x, pos):
        return apply_rope(x.view(1, 1, 1, hd), cos[pos:pos + 1], sin[pos:pos + 1]).view(hd)

    d1 = at(q, 5) @ at(k, 2)
    d2 = at(q, 20) @ at(k, 17)  # same offset 3
    d3 = at(q, 20) @ at(k, 2)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d1, d3, rtol=1e-3)
    torch.testing.assert_close(at(q, 11).norm(), q.norm(), rtol=1e-6, atol=0)


def test_causality():
    m = small()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    ids2 = ids.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % V
    with torch.no_grad():
        h1, h2 = m(ids), m(ids2)
    torch.testing.assert_close(h1[:, :6], h2[:, :6], rtol=0, atol=0)
    assert (h1[:, 6:] - h2[:, 6:]).abs().max() > 1e-6


def test_presets_sizes():
    with torch.device("meta"):
        n = {name: GPT(GPTConfig.preset(name, 4096)).num_parameters()
             for name in ("tiny", "small", "base")}
    assert 0.7e6 <= n["tiny"] <= 2e6, n
    assert 7e6 <= n["small"] <= 15e6, n
    assert 80e6 <= n["base"] <= 130e6, n


def test_config_errors():
    with pytest.raises(ValueError, match="d_model"):
        GPTConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.preset("huge", 10)
    with pytest.raises(ValueError, match=r"GPTConfig.n_layers must be >= 1, got 0"):
        GPTConfig(vocab_size=10, n_layers=0)
    with pytest.raises(TypeError, match=r"GPTConfig.vocab_size must be an int, got float"):
        GPTConfig(vocab_size=10.0)
    with pytest.raises(ValueError, match=r"GPTConfig.d_ff must be >= 1"):
        GPTConfig(vocab_size=10, d_ff=0)
    with pytest.raises(ValueError, match=r"GPTConfig.dropout must be in \[0.0, 1.0\), got 1.0"):
        GPTConfig(vocab_size=10, dropout=1.0)
    assert type(GPTConfig(vocab_size=np.int64(10)).vocab_size) is int  # numpy ints accepted
    m = small()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token_weight"):
        m.loss(torch.zeros(1, 5, dtype=torch.long), token_weight=torch.ones(1, 3))
    with pytest.raises(ValueError, match="reduction"):
        m.loss(torch.zeros(1, 5, dtype=torch.long), reduction="avg")


def test_score_model_pools_only_real_tokens():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    sm = ScoreModel.from_backbone(GPT(cfg))
    torch.nn.init.normal_(sm.head.weight)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[:, -3:] = -100
    ids2 = ids.clone()
    ids2[:, -3:] = 0  # only padded positions differ
    with torch.no_grad():
        s1, s2 = sm(ids, labels), sm(ids2, labels)
    assert s1.shape == (2,) and bool(((s1 > 0) & (s1 < 1)).all())
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    # pooling by hand
    with torch.no_grad():
        h = sm.backbone(ids)[:, :-3].mean(1)
        torch.testing.assert_close(s1, torch.sigmoid(sm.head(h).squeeze(-1)), rtol=1e-6, atol=1e-7)


def test_hf_adapter_matches_hf_loss(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the HF adapter needs transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    m = load_hf_causal_lm(tmp_path)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[1, -2:] = -100
    with torch.no_grad():
        hf_loss = m.hf(input_ids=ids, labels=labels).loss
        ours = m.loss(ids, labels)
        torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=1e-6)
        logits = m.hf(input_ids=ids).logits[:, :-1].double()
        tok = F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                              reduction="none").view(B, T - 1)
        mask = (labels[:, 1:] != -100).double()
        torch.testing.assert_close(m.sample_losses(ids, labels).double(),
                                   (tok * mask).sum(1) / mask.sum(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="path"):
        load_hf_causal_lm(tmp_path / "missing")


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_hf_adapter_reproduces_final_logit_post_processing(tmp_path, family):
    # Gemma 2 soft-caps the logits, Cohere scales them: the adapter's fused loss (what
    # `thresher score --model DIR` scores with) must match the model's own loss, which a
    # plain head + cross-entropy does not (checked below, so the case can fail).
    transformers = pytest.importorskip("transformers", reason="the HF adapter needs transformers")
    common = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    if family == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=0.05, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
        cls = transformers.CohereForCausalLM
    torch.manual_seed(0)
    cls(cfg).save_pretrained(tmp_path)
    m = load_hf_causal_lm(tmp_path)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hf_loss = m.hf(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(m.loss(ids), hf_loss, rtol=1e-5, atol=1e-6)
        plain = F.cross_entropy(F.linear(m(ids)[:, :-1], m.lm_weight).reshape(-1, V),
                                ids[:, 1:].reshape(-1))
        assert (plain - hf_loss).abs() > 100 * (1e-6 + 1e-5 * hf_loss.abs())
