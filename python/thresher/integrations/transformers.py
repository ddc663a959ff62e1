"""``apply_thresher``: the fused ``linear_weighted_cross_entropy`` inside any Hugging Face causal
LM's own ``forward``, with ``sample_weight``/``token_weight``/``loss_reduction``; and
``ThresherLM``, the thresher loss API over such a model (for the online selectors).

A patched ``forward`` runs the original one with ``labels=None`` while the LM head is tapped:
it records the hidden states it is fed and returns a small probe instead of the ``(B, T, V)``
logits. The loss is computed from those hidden states and the head's weights, with the
family's final-logit scale and soft-cap reproduced from its config, and the first labelled
call checks that transform on the probe. Without labels the original ``forward`` runs
untouched. How, and the limits: docs/integrations.md.
"""
from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thresher.models.gpt import logit_transform
from thresher.ops import linear_weighted_cross_entropy
from thresher.core.checks import IGNORE_INDEX, LOSS_REDUCTIONS, check_choice, check_tensor

__all__ = [
    "LOSS_REDUCTIONS",
    "apply_thresher",
    "remove_thresher",
    "is_thresher_patched",
    "logit_transform",
    "ThresherLM",
]

# Probe values returned by the tapped head: spread over the range where soft-capping (Gemma's
# cap is 30) and scaling are both visible, so a wrong transform cannot pass the check.
_PROBE = (-55.0, -12.0, -1.5, 0.0, 0.75, 6.0, 24.0, 70.0)
_PATCH = "_thresher_patch"        # attribute of a patched forward: (original, backend)
_VERIFIED = "_thresher_verified"  # instance flag: the one-time transform check passed
# the keywords the patched forward adds, and those of HF's loss_function it consumes
_OURS = ("sample_weight", "token_weight", "loss_reduction")
_LOSS_KWARGS = ("shift_labels", "num_items_in_batch", "ignore_index")  # HF's loss_function's


def _apply_transform(z: Tensor, scale: float, softcap: float | None) -> Tensor:
    z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


class _HeadTap:
    """While active, ``head(h)`` records ``h`` and returns the probe ``(*h.shape[:-1], P)``."""

    def __init__(self, head: nn.Module):
        self.head, self.hidden, self.calls = head, None, 0

    def _tap(self, hidden, *args, **kwargs):
        self.hidden, self.calls = hidden, self.calls + 1
        probe = torch.tensor(_PROBE, dtype=hidden.dtype, device=hidden.device)
        return probe.expand(*hidden.shape[:-1], probe.numel()).clone()

    def __enter__(self):
        self.saved = self.head.__dict__.get("forward")
        self.head.forward = self._tap
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            del self.head.forward
        else:
            self.head.forward = self.saved


def _head(model) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if head is None or not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(
            f"apply_thresher: {type(model).__name__}.get_output_embeddings() must return the LM "
            f"head, a module with a (vocab, hidden) weight; got {type(head).__name__}")
    return head


def _logits_of(out):
    return out["logits"] if isinstance(out, dict) else out[0]


def _verify(model, head: nn.Module, out, hidden: Tensor, scale: float, softcap) -> None:
    """One-time check that the model's logits are ``transform(head(h))`` with the affine head
    the fused loss uses (docs/integrations.md, "How it stays generic")."""
    name = type(model).__name__
    tol = dict(rtol=1e-5, atol=1e-5) if hidden.dtype in (torch.float32, torch.float64) \
        else dict(rtol=2e-2, atol=2e-2)
    got = _logits_of(out)
    probe = torch.tensor(_PROBE, dtype=hidden.dtype, device=hidden.device)
    want = _apply_transform(probe.double(), scale, softcap)
    if got is None or got.shape[-1] != probe.numel() or not torch.allclose(
            got.reshape(-1, probe.numel())[0].double(), want, **tol):
        raise NotImplementedError(
            f"apply_thresher: {name} post-processes its logits in a way thresher does not "
            f"reproduce (expected logits = softcap*tanh(scale*z/softcap) with scale={scale}, "
            f"softcap={softcap} from its config); its loss cannot be fused")
    if not isinstance(head, nn.Linear):
        with torch.no_grad():
            h = hidden.reshape(-1, hidden.size(-1))[:1]
            ref = type(head).forward(head, h)
            lin = F.linear(h, head.weight, getattr(head, "bias", None))
        if ref.shape != lin.shape or not torch.allclose(ref.double(), lin.double(), **tol):
            raise NotImplementedError(
                f"apply_thresher: the LM head of {name} ({type(head).__name__}) is not "
                "h @ weight.T + bias; its loss cannot be fused")
    model.__dict__[_VERIFIED] = True


def _shifted(labels, shift_labels, token_weight, ignore_index):
    """Targets and token weights per *position* (HF's shift: position t predicts labels[t+1],
    the last position nothing)."""
    if shift_labels is not None:
        return shift_labels, token_weight
    target = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    if token_weight is not None:
        token_weight = F.pad(token_weight[:, 1:], (0, 1), value=0.0)
    return target, token_weight


def _fused_loss(model, head, hidden, labels, shift_labels, *, sample_weight, token_weight,
                reduction, num_items_in_batch, ignore_index, backend):
    check_choice("loss_reduction", reduction, LOSS_REDUCTIONS)
    ref = labels if shift_labels is None else shift_labels
    name = "labels" if shift_labels is None else "shift_labels"
    check_tensor(name, ref, ndim=2, dtypes=(torch.int64, torch.int32))
    if tuple(hidden.shape[:2]) != tuple(ref.shape):
        raise ValueError(
            f"{name} has shape {tuple(ref.shape)} but the LM head saw hidden states of shape "
            f"{tuple(hidden.shape)} (logits_to_keep cannot be combined with labels)")
    if token_weight is not None:
        check_tensor("token_weight", token_weight, shape=tuple(ref.shape))
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch (the gradient-accumulation normaliser) applies to "
                         f"loss_reduction='mean' only, got loss_reduction={reduction!r}")
    target, tw = _shifted(labels, shift_labels, token_weight, ignore_index)
    target = target.to(hidden.device)
    scale, softcap = logit_transform(model.config)
    bias = getattr(head, "bias", None)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    kw = {} if softcap is None else {"softcap": softcap}
    loss = linear_weighted_cross_entropy(
        hidden, head.weight, target.contiguous(), bias=bias, sample_weight=sample_weight,
        token_weight=None if tw is None else tw.contiguous(), ignore_index=ignore_index,
        reduction="sum" if num_items_in_batch is not None else reduction, backend=backend, **kw)
    if num_items_in_batch is not None:
        n = num_items_in_batch
        loss = loss / (n.to(loss.device) if torch.is_tensor(n) else n)  # promotes as HF does
    if reduction == "none" and shift_labels is None:
        loss = F.pad(loss[:, :-1], (1, 0))  # aligned with labels, like token_weight
    return loss


def _make_forward(original, backend: str):
    sig = inspect.signature(original)
    varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if "labels" not in sig.parameters and varkw is None:
        raise ValueError(f"apply_thresher: {original.__qualname__} takes no labels: not a "
                         "causal-LM forward")

    def forward(self, *args, sample_weight=None, token_weight=None, loss_reduction="mean",
                **kwargs):
        rest = {k: v for k, v in kwargs.items() if k not in _LOSS_KWARGS}
        bound = sig.bind(self, *args, **rest)
        where = bound.arguments if "labels" in sig.parameters else \
            bound.arguments.get(varkw, {})
        labels = where.get("labels")
        shift_labels = kwargs.get("shift_labels")
        if labels is None and shift_labels is None:
            if sample_weight is not None or token_weight is not None or loss_reduction != "mean":
                raise ValueError("sample_weight, token_weight and loss_reduction need labels "
                                 "(or shift_labels)")
            return original(self, *args, **kwargs)  # untouched: generation, logits_to_keep
        where["labels"] = None
        head = _head(self)
        with _HeadTap(head) as tap:
            out = original(*bound.args, **bound.kwargs)
        if tap.calls != 1:
            raise NotImplementedError(f"apply_thresher: {type(self).__name__} called its LM head "
                                      f"{tap.calls} times in one forward; expected once")
        if not self.__dict__.get(_VERIFIED):
            _verify(self, head, out, tap.hidden, *logit_transform(self.config))
        loss = _fused_loss(self, head, tap.hidden, labels, shift_labels,
                           sample_weight=sample_weight, token_weight=token_weight,
                           reduction=loss_reduction,
                           num_items_in_batch=kwargs.get("num_items_in_batch"),
                           ignore_index=kwargs.get("ignore_index", IGNORE_INDEX),
                           backend=backend)
        if isinstance(out, dict):  # a ModelOutput: the (B, T, V) logits were never built
            return type(out)(**{k: v for k, v in out.items() if k != "logits"}, loss=loss)
        return (loss, None) + tuple(out[1:])

    functools.update_wrapper(forward, original)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    ours = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
            for n, d in zip(_OURS, (None, None, "mean"))]
    forward.__signature__ = sig.replace(parameters=params[:at] + ours + params[at:])
    setattr(forward, _PATCH, (original, backend))
    return forward


def _original_forward(cls) -> object:
    fn = cls.forward
    return getattr(fn, _PATCH, (fn,))[0]


def is_thresher_patched(model) -> bool:
    """Whether ``model`` (an instance or a class) runs the patched forward."""
    fn = model.forward if isinstance(model, type) else model.__dict__.get("forward")
    fn = getattr(fn, "__func__", fn)
    return hasattr(fn, _PATCH) or (not isinstance(model, type) and
                                   hasattr(type(model).forward, _PATCH))


def apply_thresher(model, *, backend: str = "auto"):
    """Patches a HF causal LM instance (or class: every instance) so that ``forward(...,
    labels=...)`` computes the loss with the fused ``linear_weighted_cross_entropy`` and accepts
    ``sample_weight`` ``(B,)``, ``token_weight`` ``(B, T)`` (aligned with ``labels``) and
    ``loss_reduction`` (``"mean" | "sum" | "sample" | "none"``). ``outputs.logits`` is None
    when labels are given. Applying it again replaces ``backend``; :func:`remove_thresher`
    restores the model. Returns ``model``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if isinstance(model, type):
        if not callable(getattr(model, "forward", None)):
            raise TypeError(f"model must be a HF causal-LM class or instance, got {model!r}")
        model.forward = _make_forward(_original_forward(model), backend)
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a HF causal-LM nn.Module (or class), got "
                        f"{type(model).__name__}")
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a HF PreTrainedModel with a config, got "
                        f"{type(model).__name__}")
    _head(model)
    model.forward = types.MethodType(_make_forward(_original_forward(type(model)), backend),
                                     model)
    return model


def remove_thresher(model):
    """Undoes :func:`apply_thresher` on the instance or class it was applied to."""
    if isinstance(model, type):
        if not hasattr(model.__dict__.get("forward"), _PATCH):
            raise ValueError(f"{model.__name__} is not patched by apply_thresher")
        model.forward = _original_forward(model)
        return model
    fn = getattr(model.__dict__.get("forward"), "__func__", None)
    if not hasattr(fn, _PATCH):
        raise ValueError(f"this {type(model).__name__} instance is not patched by apply_thresher"
                         + (" (its class is: call remove_thresher on the class)"
                            if hasattr(type(model).forward, _PATCH) else ""))
    del model.forward
    model.__dict__.pop(_VERIFIED, None)
    return model


class ThresherLM(nn.Module):
    """The loss API of ``thresher.models.GPT`` over a (patched) HF causal LM, so the online
    selectors (BLADE, RHO-LOSS, RHO-1, high-loss, random) score and fit references with it:
    ``loss(input_ids, labels=None, *, reduction, sample_weight, token_weight)`` runs the patched
    forward (``"none"`` returns ``(B, T-1)`` aligned with ``labels[:, 1:]``, as GPT's). No
    attention mask is passed: right padding (labels -100) cannot affect earlier tokens under
    causal attention; left-padded batches are not supported. Patches ``hf_model`` if needed."""

    def __init__(self, hf_model: nn.Module, *, backend: str = "auto"):
        super().__init__()
        if not is_thresher_patched(hf_model):
            apply_thresher(hf_model, backend=backend)
        self.hf = hf_model
        self._no_cache = ({"use_cache": False} if "use_cache" in inspect.signature(
            hf_model.forward).parameters else {})

    @property
    def config(self):
        return self.hf.config

    def forward(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    def loss(self, input_ids: Tensor, labels: Tensor | None = None, *, reduction: str = "mean",
             sample_weight: Tensor | None = None, token_weight: Tensor | None = None,
             backend: str | None = None) -> Tensor:
        if backend not in (None, "auto"):
            raise ValueError("ThresherLM.loss: the backend is fixed by apply_thresher(backend=...)"
                             f", got backend={backend!r}")
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        labels = input_ids if labels is None else labels
        if token_weight is not None and token_weight.dim() == 2 and \
                token_weight.size(1) == input_ids.size(1) - 1:
            token_weight = F.pad(token_weight, (1, 0))  # GPT.loss also takes it pre-shifted
        out = self.hf(input_ids=input_ids, labels=labels, loss_reduction=reduction,
                      sample_weight=sample_weight, token_weight=token_weight, **self._no_cache)
        loss = out["loss"] if isinstance(out, dict) else out[0]
        return loss[:, 1:] if reduction == "none" else loss

    @torch.no_grad()
    def sample_losses(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        """Token-mean next-token loss of each sequence, ``(B,)``, no graph."""
        return self.loss(input_ids, labels, reduction="sample")

