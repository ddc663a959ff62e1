"""Triton kernels of the weighted cross-entropy op (kernels/cross_entropy.py).

No GPU here, so GPU readiness is shown two ways (docs/architecture.md, "Testing without a GPU"):

* numerics: the kernels run under the Triton interpreter on CPU tensors. TRITON_INTERPRET
  must be set before triton is first imported, and this pytest process may already have
  imported triton without it, so every interpreter check runs in one child process
  (``python this_file.py interp``) that reports a JSON verdict per case;
* compilation: every kernel, dtype and launch configuration the launchers use is
  AOT-compiled for sm_80 and sm_90 (``aot_compile_stats``), in children without
  TRITON_INTERPRET, and must not spill.

The children start together the first time any of these tests needs one, so on two cores
the three of them overlap (the whole file takes ~20-30 s).

Tolerances: a float64 ground truth from torch's own log_softmax/logsumexp and autograd; a
kernel result's max error may be at most 2x that of the same computation done eagerly by
PyTorch in the input dtype, plus a tiny floor (2^-20 of the quantity's scale).
"""
from __future__ import annotations

import math
import os
import sys
import traceback
import zlib

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _children import Child, assert_compiled_cleanly, emit  # noqa: E402

THIS = os.path.abspath(__file__)
KERNEL_NAMES = tuple(k + sfx for k in ("ce_fwd", "ce_fwd_grad", "ce_bwd") for sfx in ("", "_softcap"))
DTYPES = ("fp32", "bf16", "fp16")
REDUCTIONS = ("none", "sample", "sum", "mean")


# ----------------------------------------------------------------------------------------
# Interpreter cases (run in the child)
# ----------------------------------------------------------------------------------------

# name -> keyword arguments of _kernel_case. Few rows: the interpreter runs the programs one
# after another, each tile op in numpy (the whole set takes ~8 s).
KERNEL_CASES = {}
for _dt in DTYPES:
    KERNEL_CASES[f"{_dt}-small-vocab"] = dict(dtype=_dt, n=8, v=1000, eps=0.2, zl=1e-2)
    KERNEL_CASES[f"{_dt}-multi-tile-smooth-zloss"] = dict(dtype=_dt, n=6, v=5000, eps=0.1, zl=1e-3)
    KERNEL_CASES[f"{_dt}-inplace"] = dict(dtype=_dt, n=5, v=4500, eps=0.05, zl=1e-4, inplace=True)
    KERNEL_CASES[f"{_dt}-row-stride"] = dict(dtype=_dt, n=5, v=4100, pad=37, eps=0.1)
    KERNEL_CASES[f"{_dt}-v50257"] = dict(dtype=_dt, n=2, v=50257, eps=0.1, zl=1e-4)
KERNEL_CASES.update({
    "bf16-row-stride-inplace": dict(dtype="bf16", n=4, v=4100, pad=60, inplace=True, zl=1e-3),
    "fp32-small-vocab-inplace-stride": dict(dtype="fp32", n=7, v=33, pad=3, inplace=True, eps=0.3),
    "bf16-one-row": dict(dtype="bf16", n=1, v=3000, eps=0.1),
    "fp32-one-row-one-class": dict(dtype="fp32", n=1, v=1),
    "fp16-loss-only": dict(dtype="fp16", n=6, v=4500, eps=0.1, zl=1e-3, with_grad=False),
    "fp32-all-ignored": dict(dtype="fp32", n=3, v=5000, ignore_all=True),
    "fp32-ignore-index-0": dict(dtype="fp32", n=6, v=700, ignore_index=0),
    "fp32-neg-inf-logits": dict(dtype="fp32", n=4, v=5000, neg_inf=True),
    "bf16-v128256": dict(dtype="bf16", n=2, v=128256, eps=0.1, zl=1e-4),
    # soft-capping (Gemma 2/3: 30 for the final logits); scale 4 logits hit the tanh's
    # curved part at cap 5 and its saturated part at cap 1
    "fp32-softcap": dict(dtype="fp32", n=6, v=5000, eps=0.1, zl=1e-3, cap=5.0),
    "bf16-softcap-inplace": dict(dtype="bf16", n=5, v=4500, eps=0.05, cap=30.0, inplace=True),
    "fp16-softcap-small": dict(dtype="fp16", n=8, v=1000, cap=1.0),
    "fp32-softcap-neg-inf": dict(dtype="fp32", n=4, v=5000, neg_inf=True, cap=5.0),
})

OP_CASES = {f"{dt}-{red}": dict(dtype=dt, reduction=red) for dt in ("fp32", "bf16")
            for red in REDUCTIONS}
OP_CASES.update({
    "fp16-mean": dict(dtype="fp16", reduction="mean"),
    "bf16-mean-2d-multi-tile": dict(dtype="bf16", reduction="mean", shape=(6, 5000)),
    "fp32-none-2d-multi-tile": dict(dtype="fp32", reduction="none", shape=(5, 4500)),
    "bf16-sum-no-grad": dict(dtype="bf16", reduction="sum", no_grad=True),
    "fp32-linear-mean": dict(dtype="fp32", reduction="mean", linear=True),
    "bf16-linear-none": dict(dtype="bf16", reduction="none", linear=True),
    "fp32-mean-softcap": dict(dtype="fp32", reduction="mean", softcap=3.0),
    "bf16-linear-sample-softcap": dict(dtype="bf16", reduction="sample", linear=True, softcap=3.0),
    # class weights with label smoothing: the smoothing term is composed outside the kernels
    "fp32-sample-class-weight": dict(dtype="fp32", reduction="sample", class_weight=True),
    "bf16-mean-class-weight": dict(dtype="bf16", reduction="mean", class_weight=True),
    "fp32-linear-sum-class-weight": dict(dtype="fp32", reduction="sum", linear=True,
                                         class_weight=True),
    "bf16-linear-none-class-weight": dict(dtype="bf16", reduction="none", linear=True,
                                          class_weight=True),
})


def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[name]


def _rows_autograd(x, target, coef, ii, eps, zl, dtype, cap=0.0):
    """(loss, lse, grad) of the row contract computed by torch (log_softmax + autograd) in
    ``dtype``: float64 is the ground truth, the input dtype is "PyTorch eager"."""
    import torch
    xd = x.detach().to(dtype).requires_grad_(True)
    xc = cap * torch.tanh(xd / cap) if cap else xd
    valid = target != ii
    tgt = torch.where(valid, target, torch.zeros_like(target))
    logp = torch.log_softmax(xc, -1)
    lse = torch.logsumexp(xc, -1)
    loss = -(1 - eps) * logp.gather(1, tgt[:, None]).squeeze(1) + zl * lse * lse
    if eps:
        loss = loss - eps * logp.mean(-1)
    zero = torch.zeros((), dtype=dtype)
    loss = torch.where(valid, loss, zero)
    lse = torch.where(valid, lse, zero)
    w = torch.where(valid, coef.to(dtype), zero)
    (grad,) = torch.autograd.grad((loss * w).sum(), xd)
    return loss.detach(), lse.detach(), grad


def _within(what, got, truth, eager, other=None):
    """max|got - other| <= 2 max|eager - truth| + 2^-20 max(1, max|truth|), ``other``
    defaulting to the truth (else e.g. thresher's reference: within the same budget).
    Returns a message, or None when it holds."""
    import torch
    other = truth if other is None else other
    got, other, truth, eager = got.double(), other.double(), truth.double(), eager.double()
    fin = torch.isfinite(truth)
    for name, t in (("result", got), ("comparand", other)):
        if not torch.equal(fin, torch.isfinite(t)) or not torch.equal(t[~fin], truth[~fin]):
            return f"{what}: non-finite entries of the {name} differ from the truth"
    got, other, truth, eager = got[fin], other[fin], truth[fin], eager[fin]
    if truth.numel() == 0:
        return None
    err = float((got - other).abs().max())
    eager_err = float((eager - truth).abs().max())
    bound = 2 * eager_err + 2.0**-20 * max(1.0, float(truth.abs().max()))
    if not err <= bound:
        return f"{what}: max error {err:.3g} > bound {bound:.3g} (eager error {eager_err:.3g})"
    return None


def _kernel_case(dtype, n, v, eps=0.0, zl=0.0, pad=0, inplace=False, with_grad=True,
                 ignore_index=-100, ignore_all=False, neg_inf=False, cap=0.0):
    import torch

    from thresher.kernels import cross_entropy as K
    from thresher.ops.cross_entropy import reference_cross_entropy_rows

    dt = _torch_dtype(dtype)
    g = torch.Generator().manual_seed(n * 100003 + v)
    base = torch.randn(n, v, generator=g) * 4
    if neg_inf:  # masked vocabulary: row 0's first tile is entirely -inf
        base[0, : min(v - 1, 4500)] = -math.inf
        base[1, ::3] = -math.inf
    target = torch.randint(0, v, (n,), generator=g)
    if neg_inf:
        target[0] = v - 1
        target[1] = 1
    if n >= 3:
        target[n // 2] = ignore_index
    if ignore_all:
        target[:] = ignore_index
    coef = torch.rand(n, generator=g) + 0.25
    if n >= 4:
        coef[1] = 0.0  # zero weight: the kernel writes zeros without reading the row
    x_buf = torch.full((n, v + pad), 7.0, dtype=dt)
    x = x_buf[:, :v]
    x.copy_(base)
    x0 = x.clone()

    truth = _rows_autograd(x0, target, coef, ignore_index, eps, zl, torch.float64, cap)
    eager = _rows_autograd(x0, target, coef, ignore_index, eps, zl, dt, cap)
    ref = reference_cross_entropy_rows(x0, target, coef, ignore_index, eps, zl, cap)
    problems = []

    def check(what, got, idx):
        for msg in (_within(f"{what} vs truth", got, truth[idx], eager[idx]),
                    _within(f"{what} vs reference", got, truth[idx], eager[idx], ref[idx])):
            if msg:
                problems.append(msg)

    def fresh_grad():
        if inplace:
            return x  # the kernel overwrites the logits with the gradient
        buf = torch.full((n, v + 2 * pad), -3.0, dtype=dt)  # a row stride of its own
        return buf[:, :v]

    # forward (with the fused gradient unless loss-only)
    lse = torch.full((n,), math.nan)
    loss = torch.full((n,), math.nan)
    grad = fresh_grad() if with_grad else None
    K.ce_forward(x, target, lse, loss, grad, coef if with_grad else None, ignore_index, eps, zl,
                 cap)
    check("loss", loss, 0)
    check("lse", lse, 1)
    if with_grad:
        check("fused grad", grad, 2)
    ign = target == ignore_index
    if bool((loss[ign] != 0).any() | (lse[ign] != 0).any()):
        problems.append("ignored rows: loss/lse not exactly 0")
    if with_grad and bool((grad[ign | (coef == 0)] != 0).any()):
        problems.append("ignored / zero-weight rows: fused grad not exactly 0")
    if pad and not inplace and with_grad:
        if not bool((grad._base[:, v:] == -3.0).all()):
            problems.append("fused grad: wrote outside the row (padding columns changed)")
    if pad and not bool((x_buf[:, v:] == 7.0).all()):
        problems.append("x padding columns changed")

    # backward from the kernel's saved lse, with a different per-row coefficient
    if with_grad:
        coef2 = torch.rand(n, generator=g) * 2
        if n >= 5:
            coef2[-1] = 0.0
        x.copy_(x0)
        grad2 = fresh_grad()
        K.ce_backward(x, target, lse, coef2, grad2, ignore_index, eps, zl, cap)
        t2 = _rows_autograd(x0, target, coef2, ignore_index, eps, zl, torch.float64, cap)[2]
        e2 = _rows_autograd(x0, target, coef2, ignore_index, eps, zl, dt, cap)[2]
        r2 = reference_cross_entropy_rows(x0, target, coef2, ignore_index, eps, zl, cap,
                                          lse=lse)[2]
        for msg in (_within("bwd grad vs truth", grad2, t2, e2),
                    _within("bwd grad vs reference", grad2, t2, e2, r2)):
            if msg:
                problems.append(msg)
        if bool((grad2[ign | (coef2 == 0)] != 0).any()):
            problems.append("ignored / zero-weight rows: bwd grad not exactly 0")
    return problems


def _op_case(dtype, reduction, shape=(2, 5, 300), no_grad=False, linear=False, softcap=None,
             class_weight=False):
    import torch

    import thresher

    dt = _torch_dtype(dtype)
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, reduction, shape, linear)).encode()))
    lead, v = shape[:-1], shape[-1]
    target = torch.randint(0, v, lead, generator=g)
    target.view(-1)[:: 4] = -100
    sw = torch.rand(lead[0], generator=g) + 0.5
    tw = torch.rand(lead, generator=g)
    kw = dict(sample_weight=sw, token_weight=tw, reduction=reduction, label_smoothing=0.1,
              z_loss=1e-3, softcap=softcap)
    if class_weight:  # one class weighted 0
        cw = torch.rand(v, generator=g) * 2
        cw[target.view(-1)[1]] = 0.0
        kw["weight"] = cw
    if linear:
        # the fused LM-head op: the kernel overwrites each logits chunk with its gradient
        hidden = torch.randn(*lead, 16, generator=g)
        weight = torch.randn(v, 16, generator=g) * 0.5
        inputs = {d: (hidden.to(d, copy=True).requires_grad_(True),
                      weight.to(d, copy=True).requires_grad_(True)) for d in (dt, torch.float64)}

        def fn(backend, d):
            h, w = inputs[d]
            return thresher.linear_weighted_cross_entropy(h, w, target, backend=backend,
                                                          chunk_size=3, **kw)
    else:
        logits = torch.randn(*shape, generator=g) * 3
        inputs = {d: (logits.to(d, copy=True).requires_grad_(True),) for d in (dt, torch.float64)}

        def fn(backend, d):
            return thresher.weighted_cross_entropy(inputs[d][0], target, backend=backend, **kw)

    def run(backend, d):
        for t in inputs[d]:
            t.grad = None
        if no_grad:
            with torch.no_grad():
                return fn(backend, d).detach(), ()
        out = fn(backend, d)
        up = torch.rand(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out.backward(up.to(out.dtype) if out.dim() else torch.tensor(0.5, dtype=out.dtype))
        return out.detach(), tuple(t.grad.clone() for t in inputs[d])

    got, got_g = run("triton", dt)
    eager, eager_g = run("reference", dt)  # plain PyTorch on the same-dtype inputs
    truth, truth_g = run("reference", torch.float64)
    problems = []
    for what, a, b, c in [("loss", got, truth, eager)] + [
            (f"grad[{i}]", a, b, c) for i, (a, b, c) in enumerate(zip(got_g, truth_g, eager_g))]:
        msg = _within(what, a, b, c)
        if msg:
            problems.append(msg)
    if got.dtype != torch.float32:
        problems.append(f"loss dtype {got.dtype}, expected float32")
    return problems


def _empty_batch_case():
    import torch

    from thresher.kernels import cross_entropy as K
    x = torch.empty(0, 5000, dtype=torch.bfloat16)
    t = torch.empty(0, dtype=torch.int64)
    f = torch.empty(0)
    K.ce_forward(x, t, f, f, x, f, -100, 0.1, 0.0)
    K.ce_forward(x, t, f, f, None, None, -100, 0.1, 0.0)
    K.ce_backward(x, t, f, f, x, -100, 0.1, 0.0)
    return []


def _bad_target_case():
    """Targets outside [0, V) (what a compiled graph can pass: its value checks are skipped)
    are never read: NaN loss for the row, and a gradient without a target term."""
    import torch

    from thresher.kernels import cross_entropy as K
    problems = []
    for v in (700, 5000):
        x = torch.randn(4, v, generator=torch.Generator().manual_seed(v))
        t = torch.tensor([1, v, -7, 2**40])
        lse, loss = torch.empty(4), torch.empty(4)
        grad = torch.empty_like(x)
        K.ce_forward(x, t, lse, loss, grad, torch.ones(4), -100, 0.0, 0.0)
        if not (torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()):
            problems.append(f"V={v}: loss {loss.tolist()}, expected NaN for rows 1-3")
        p = torch.softmax(x.double(), 1)
        if not torch.allclose(grad[1:].double(), p[1:], rtol=1e-5, atol=1e-7):
            problems.append(f"V={v}: bad-target gradient rows are not the plain softmax")
    return problems


def _gpu_rounding_for_bf16():
    """The interpreter (triton 3.7) converts fp32 -> bf16 by dropping mantissa bits; compiled
    for a GPU, the same ``.to(tl.bfloat16)`` is an LLVM fptrunc, i.e. ``cvt.rn.bf16.f32``
    (round to nearest even; the AOT PTX shows ``cvt.rn.bf16x2.f32``). Emulate the GPU, or
    every bf16 gradient would carry up to 1 ulp of interpreter-only error."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16),
                                            dst_type.scalar)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl


def _child_interp():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    torch.set_num_threads(1)
    _gpu_rounding_for_bf16()
    results = {}
    jobs = [("kernel:" + k, lambda kw=kw: _kernel_case(**kw)) for k, kw in KERNEL_CASES.items()]
    jobs += [("op:" + k, lambda kw=kw: _op_case(**kw)) for k, kw in OP_CASES.items()]
    jobs += [("kernel:empty-batch", _empty_batch_case), ("kernel:bad-target", _bad_target_case)]
    for name, job in jobs:
        try:
            problems = job()
        except Exception:  # noqa: BLE001
            problems = [traceback.format_exc()]
        results[name] = problems
    return results


def _child_aot(cc):
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    from thresher.kernels import cross_entropy as K
    return {"stats": K.aot_compile_stats(cc), "configs": [list(c) for c in K.CONFIGS]}


# ----------------------------------------------------------------------------------------
# Children (started together, collected lazily)
# ----------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def children(request):
    """Starts only the children the selected tests need, all at once."""
    wanted = {"interp": False, "aot80": False, "aot90": False}
    for item in request.session.items:
        if item.module is request.module:
            name = item.originalname
            if name in ("test_interpreter_case", "test_every_case_ran"):
                wanted["interp"] = True
            elif name == "test_aot_compiles_without_spills":
                wanted["aot" + str(item.callspec.params["cc"])] = True
    kids = {}
    if wanted["interp"]:
        kids["interp"] = Child(THIS, ["interp"], interpret=True)
    for cc in (80, 90):
        if wanted[f"aot{cc}"]:
            kids[f"aot{cc}"] = Child(THIS, ["aot", str(cc)], interpret=False)
    yield kids
    for kid in kids.values():
        if kid.proc.poll() is None:
            kid.kill()
            kid.proc.communicate()


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------

ALL_CASES = (["kernel:" + k for k in KERNEL_CASES] + ["op:" + k for k in OP_CASES]
             + ["kernel:empty-batch", "kernel:bad-target"])


@pytest.mark.parametrize("case", ALL_CASES)
def test_interpreter_case(children, case):
    problems = children["interp"].result()[case]
    assert not problems, "\n".join(problems)


def test_every_case_ran(children):
    assert sorted(children["interp"].result()) == sorted(ALL_CASES)


@pytest.mark.parametrize("cc", (80, 90))
def test_aot_compiles_without_spills(children, cc):
    res = children[f"aot{cc}"].result()
    stats = res["stats"]
    keys = {"kernel", "dtype", "cc", "num_warps", "n_regs", "n_spills", "shared"}
    for s in stats:
        assert keys <= set(s), s
        assert s["cc"] == cc
    # every kernel x dtype x launch configuration the launchers use (both row alignments)
    seen = {(s["kernel"], s["dtype"], s["block_v"], s["num_warps"], s["aligned"]) for s in stats}
    want = {(k, d, b, w, a) for k in KERNEL_NAMES for d in DTYPES for b, w in res["configs"]
            for a in (True, False)}
    assert len(stats) == len(want)
    assert seen == want
    assert_compiled_cleanly(stats)


if __name__ == "__main__":
    mode = sys.argv[1]
    result = _child_interp() if mode == "interp" else _child_aot(int(sys.argv[2]))
    emit(result)
