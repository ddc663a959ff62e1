"""apply_thresher: the patched forward's loss and every parameter gradient equal the unpatched
model's (float64 truth computed from its own logits), on ten architecture families."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from thresher.integrations import (
    LOSS_REDUCTIONS,
    ThresherLM,
    apply_thresher,
    is_thresher_patched,
    remove_thresher,
)

from .conftest import ARCHS, V, tiny_model

B, T = 3, 11


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, 7:] = -100        # right padding
    labels[2, :] = -100         # a row with no target at all
    labels[1, 3] = -100
    sw = torch.rand(B, generator=g, dtype=torch.float64) + 0.25
    tw = torch.rand(B, T, generator=g, dtype=torch.float64)
    return ids, labels, sw, tw


def reference_loss(logits, labels, reduction, sample_weight=None, token_weight=None,
                   num_items=None):
    """The documented semantics, transcribed on the unpatched model's (B, T, V) logits."""
    tgt = labels[:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), tgt.reshape(-1),
                          ignore_index=-100, reduction="none").reshape(tgt.shape)
    tw = (tgt != -100).double()
    if token_weight is not None:
        tw = tw * token_weight[:, 1:]
    sw = torch.ones(labels.size(0), dtype=torch.float64) if sample_weight is None \
        else sample_weight
    if reduction == "none":
        return F.pad(tok * tw * sw[:, None], (1, 0))
    if reduction == "sample":
        return (tok * tw).sum(1) / tw.sum(1).clamp_min(1e-300) * sw
    total = (tok * tw * sw[:, None]).sum()
    if reduction == "sum":
        return total
    return total / ((tw * sw[:, None]).sum() if num_items is None else num_items)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    g = torch.Generator().manual_seed(1)
    cot = torch.rand(out.shape, generator=g, dtype=out.dtype)  # a generic upstream gradient
    (out * cot).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


CASES = [(r, None) for r in LOSS_REDUCTIONS] + [("mean", 17)]  # 17: num_items_in_batch


@pytest.mark.parametrize("weights", ["none", "sample", "token", "both"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_and_gradients_match_unpatched_float64(arch, weights):
    model = tiny_model(arch)
    ids, labels, sw, tw = _batch()
    sw = sw if weights in ("sample", "both") else None
    tw = tw if weights in ("token", "both") else None
    unpatched = [_loss_and_grads(model, lambda: reference_loss(
        model(input_ids=ids).logits, labels, r, sw, tw, n)) for r, n in CASES]
    apply_thresher(model)
    for (r, n), (want, want_g) in zip(CASES, unpatched):
        kw = {} if n is None else {"num_items_in_batch": torch.tensor(n)}
        got, got_g = _loss_and_grads(model, lambda: model(
            input_ids=ids, labels=labels, sample_weight=sw, token_weight=tw,
            loss_reduction=r, **kw).loss)
        assert got.shape == want.shape and got.dtype == torch.float64, (r, got.shape)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{arch} {r} n={n}")
        assert got_g.keys() == want_g.keys()
        for name in want_g:
            torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-9, atol=1e-12,
                                       msg=f"{arch} {r} n={n}: grad of {name}")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi", "cohere"])
def test_unweighted_loss_equals_hf_own_loss(arch):
    """HF's own ForCausalLMLoss (which computes in float32), with and without the Trainer's
    num_items_in_batch: same loss, same gradients."""
    model = tiny_model(arch, dtype=torch.float32)
    ids, labels, _, _ = _batch(3)
    # the Trainer's normaliser may be a float64 count (ThresherTrainer's weighted one)
    for kw in ({}, {"num_items_in_batch": torch.tensor(23)},
               {"num_items_in_batch": torch.tensor(23.0, dtype=torch.float64)}):
        remove_thresher(model) if is_thresher_patched(model) else None
        want, want_g = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels,
                                                            **kw).loss)
        apply_thresher(model)
        got, got_g = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels,
                                                          **kw).loss)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        for name in want_g:
            torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-4, atol=1e-6)


def test_bfloat16_close_to_float64_truth():
    model = tiny_model("gemma2", dtype=torch.float64)
    ids, labels, sw, _ = _batch(4)
    want = reference_loss(model(input_ids=ids).logits, labels, "mean", sw)
    apply_thresher(model.to(torch.bfloat16))
    got = model(input_ids=ids, labels=labels, sample_weight=sw.float()).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_without_labels_forward_and_generation_are_unchanged(arch):
    model = tiny_model(arch)
    ids, _, _, _ = _batch(5)
    before = model(input_ids=ids).logits
    last = model(input_ids=ids, logits_to_keep=1).logits
    gen = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    apply_thresher(model)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits, last)
    assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False), gen)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss is not None  # never materialised with labels


def test_remove_restores_the_model_and_the_class_patch():
    model = tiny_model("llama")
    cls = type(model)
    ids, labels, _, _ = _batch(6)
    want = model(input_ids=ids, labels=labels).loss
    apply_thresher(model)
    assert is_thresher_patched(model) and not is_thresher_patched(cls)
    assert {"sample_weight", "token_weight", "loss_reduction"} <= set(
        inspect.signature(model.forward).parameters)  # Trainer keeps such dataset columns
    remove_thresher(model)
    assert "forward" not in model.__dict__ and not is_thresher_patched(model)
    assert torch.equal(model(input_ids=ids, labels=labels).loss, want)
    original = cls.forward
    try:
        apply_thresher(cls)
        fresh = tiny_model("llama")
        assert is_thresher_patched(fresh)
        assert fresh(input_ids=ids, labels=labels).logits is None
        with pytest.raises(ValueError, match="its class is"):
            remove_thresher(fresh)
    finally:
        remove_thresher(cls)
    assert cls.forward is original
    with pytest.raises(ValueError, match="not patched"):
        remove_thresher(model)


def test_tuple_outputs_keep_positions():
    model = apply_thresher(tiny_model("llama"))
    ids, labels, _, _ = _batch(7)
    out = model(input_ids=ids, labels=labels, return_dict=False)
    assert out[1] is None
    torch.testing.assert_close(out[0], model(input_ids=ids, labels=labels).loss)


def test_bad_arguments_name_themselves():
    model = apply_thresher(tiny_model("llama"))
    ids, labels, sw, tw = _batch(8)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(input_ids=ids, labels=labels, loss_reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        model(input_ids=ids, labels=labels, loss_reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="token_weight"):
        model(input_ids=ids, labels=labels, token_weight=tw[:, 1:])
    with pytest.raises(ValueError, match="need labels"):
        model(input_ids=ids, sample_weight=sw)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(TypeError, match="model must be"):
        apply_thresher(torch.nn.Linear(2, 2))


def test_unknown_logit_post_processing_is_refused():
    base = type(tiny_model("llama"))

    class Doubled(base):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = apply_thresher(Doubled(tiny_model("llama").config))
    ids, labels, _, _ = _batch(9)
    with pytest.raises(NotImplementedError, match="Doubled post-processes its logits"):
        model(input_ids=ids, labels=labels)


def test_thresher_lm_has_the_gpt_loss_api_for_selectors():
    from thresher.selection.online import build_online_selector

    model = tiny_model("phi")
    ids, labels, _, _ = _batch(10)
    logits = model(input_ids=ids).logits
    lm = ThresherLM(model)
    assert is_thresher_patched(model)
    torch.testing.assert_close(lm.sample_losses(ids, labels),
                               reference_loss(logits, labels, "sample"), rtol=1e-10, atol=0)
    none = lm.loss(ids, labels, reduction="none")
    assert none.shape == (B, T - 1)
    torch.testing.assert_close(none, reference_loss(logits, labels, "none")[:, 1:])
    ref = copy.deepcopy(lm)   # what the selectors' references are made of
    assert ref.hf.forward.__self__ is ref.hf
    torch.testing.assert_close(ref.loss(ids, labels), lm.loss(ids, labels), rtol=0, atol=0)
    val = torch.randint(0, V, (8, T))
    for name, opts in (("blade", dict(tau=2, ref_steps=1)), ("rho1", dict(ref_steps=1)),
                       ("highloss", {}), ("random", {})):
        sel = build_online_selector(name, lm, val, gamma=0.5, **opts)
        alpha = sel.select(ids, labels)
        assert alpha.shape[0] == B and set(alpha.unique().tolist()) <= {0.0, 1.0}


def test_shift_labels_and_ignore_index_keywords():
    model = tiny_model("granite")
    ids, labels, sw, tw = _batch(11)
    apply_thresher(model)
    want = model(input_ids=ids, labels=labels, sample_weight=sw, loss_reduction="sample").loss
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    got = model(input_ids=ids, shift_labels=shifted, sample_weight=sw,
                loss_reduction="sample").loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    minus_one = labels.masked_fill(labels == -100, -1)
    got = model(input_ids=ids, labels=minus_one, ignore_index=-1, sample_weight=sw,
                loss_reduction="sample").loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _AffineHead(torch.nn.Module):
    def __init__(self, linear, factor=1.0):
        super().__init__()
        self.weight, self.bias, self.factor = linear.weight, linear.bias, factor

    def forward(self, h):
        return F.linear(h, self.weight, self.bias) * self.factor


def test_heads_that_are_not_nn_linear_are_checked():
    ids, labels, _, _ = _batch(12)
    model = tiny_model("phi")
    model.set_output_embeddings(_AffineHead(model.get_output_embeddings()))
    want = reference_loss(model(input_ids=ids).logits, labels, "mean")
    apply_thresher(model)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want)
    model = tiny_model("phi")
    model.set_output_embeddings(_AffineHead(model.get_output_embeddings(), factor=2.0))
    apply_thresher(model)
    with pytest.raises(NotImplementedError, match="is not h @ weight.T"):
        model(input_ids=ids, labels=labels)


def test_a_head_called_twice_is_refused():
    base = type(tiny_model("llama"))

    class Twice(base):
        def forward(self, *args, **kwargs):
            self.lm_head(torch.zeros(1, 1, self.config.hidden_size))
            return super().forward(*args, **kwargs)

    model = apply_thresher(Twice(tiny_model("llama").config))
    ids, labels, _, _ = _batch(13)
    with pytest.raises(NotImplementedError, match="2 times"):
        model(input_ids=ids, labels=labels)
