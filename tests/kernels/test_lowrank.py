"""Triton kernels of the low-rank Adam step (kernels/lowrank.py).

GPU readiness without a GPU (docs/architecture.md): the numerics run under the Triton interpreter on
CPU tensors in a child process (TRITON_INTERPRET must be set before triton is imported),
and every kernel variant x dtype the launchers use is AOT-compiled for sm_80 and sm_90 in
another child and must not spill. Both children start together when the module's first test
needs them.

Ground truth: the float64 transcription of docs/algorithms.md §3/§4 from tests/ops/test_lowrank.py
(reimplemented here to keep the child self-contained); a kernel's error must be at most 2x
the error of PyTorch eager in the input dtype (the same formulas as torch ops, each rounding
to that dtype) plus a floor of 2^-20 of the quantity's scale -- for bf16/fp16 the
floor is one unit in the last place of the stored value, since every backend rounds the
result to the storage dtype once.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _children import Child, assert_compiled_cleanly, emit, run_jobs  # noqa: E402

THIS = os.path.abspath(__file__)

CASES = {}
for _dt in ("fp32", "bf16", "fp16"):
    for _side, _p, _q, _r in (("left", 37, 150, 5), ("right", 150, 37, 5), ("left", 70, 200, 40)):
        for _lordo in (False, True):
            CASES[f"{_dt}-{_side}-{_p}x{_q}-r{_r}-{'lordo' if _lordo else 'galore'}"] = dict(
                dtype=_dt, side=_side, p=_p, q=_q, r=_r, lordo=_lordo)
CASES["fp32-left-one-row"] = dict(dtype="fp32", side="left", p=1, q=33, r=1, lordo=True)
CASES["fp32-row-strided-param"] = dict(dtype="fp32", side="left", p=20, q=70, r=4, lordo=True,
                                       pad=9)
CASES["fp32-right-square-full-rank"] = dict(dtype="fp32", side="right", p=24, q=24, r=24,
                                            lordo=False)


def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _step_in(dtype, W, G, Q, m, v, E, side, hp):
    """docs/algorithms.md §3/§4 written out with torch ops in ``dtype``: float64 is the ground
    truth, the storage dtype is "PyTorch eager" (every op rounding to that dtype)."""
    W, G, Q, m, v = (t.to(dtype) for t in (W, G, Q, m, v))
    lordo = E is not None
    A = G + E.to(dtype) if lordo else G
    R = Q.T @ A if side == "left" else A @ Q
    E_new = A - (Q @ R if side == "left" else R @ Q.T) if lordo else None
    b1, b2, t = hp["b1"], hp["b2"], hp["step"]
    m = b1 * m + (1 - b1) * R
    v = b2 * v + (1 - b2) * R * R
    mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
    N = mh / (vh.sqrt() + hp["eps"])
    low = Q @ N if side == "left" else N @ Q.T
    W = W * (1 - hp["lr"] * hp["wd"])
    if not lordo:
        return W - hp["lr"] * hp["scale"] * low, m, v, None
    D = vh.mean(0, keepdim=True).sqrt() if side == "left" else vh.mean(1, keepdim=True).sqrt()
    W = W - hp["lr"] * ((1 - hp["omega"]) * G / (hp["mu"] * (D + hp["eps"]))
                        + hp["omega"] * hp["scale"] * low)
    return W, m, v, E_new


def _case(dtype, side, p, q, r, lordo, pad=0):
    import torch

    from thresher.ops.lowrank import lowrank_adam_step

    dt = _torch_dtype(dtype)
    g = torch.Generator().manual_seed(p * 7919 + q * 31 + r)
    buf = torch.randn(p, q + pad, generator=g).to(dt)
    W = buf[:, :q]
    G = torch.randn(p, q, generator=g).to(dt)
    dim = p if side == "left" else q
    Q = torch.linalg.qr(torch.randn(dim, r, generator=g, dtype=torch.float64)).Q.to(dt)
    low = (r, q) if side == "left" else (p, r)
    m = (0.1 * torch.randn(low, generator=g)).to(dt)
    v = (0.05 * torch.rand(low, generator=g)).to(dt)
    E = (0.3 * torch.randn(p, q, generator=g)).to(dt) if lordo else None
    hp = dict(step=3, lr=0.05, b1=0.9, b2=0.99, eps=1e-6, wd=0.1, scale=0.25,
              omega=0.4 if lordo else 0.0, mu=1.5)
    truth = _step_in(torch.float64, W, G, Q, m, v, E, side, hp)
    eager = _step_in(dt, W, G, Q, m, v, E, side, hp)
    W0 = buf.clone()
    m2, v2 = m.clone(), v.clone()
    E2 = None if E is None else E.clone()
    lowrank_adam_step(W, G, Q, m2, v2, side=side, step=hp["step"], lr=hp["lr"], beta1=hp["b1"],
                      beta2=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"], scale=hp["scale"],
                      error=E2, omega=hp["omega"], mu=hp["mu"], backend="triton")
    problems = []
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dt]
    for name, got, t, e in zip(("param", "exp_avg", "exp_avg_sq", "error"), (W, m2, v2, E2),
                               truth, eager):
        if t is None:
            continue
        if got.dtype != dt:
            problems.append(f"{name}: dtype {got.dtype}")
        err = float((got.double() - t).abs().max())
        eager_err = float((e.double() - t).abs().max())
        scale = max(1.0, float(t.abs().max())) if dt == torch.float32 else float(t.abs().max())
        bound = 2 * eager_err + max(2.0 ** -20, ulp) * scale
        if not err <= bound:
            problems.append(f"{name}: error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})")
    if pad and not torch.equal(buf[:, q:], W0[:, q:]):
        problems.append("wrote outside the parameter's row (padding changed)")
    return problems


def _empty_case():
    import torch

    from thresher.kernels import lowrank as K
    r = torch.empty(0, 5)
    K.lowrank_moments(r, r.clone(), r.clone(), 0, 5, 5, 1, 0.9, 0.99, 0.1, 0.01, 1e-8,
                      torch.ones(5))
    K.backproject_update(torch.empty(0, 5), torch.empty(0, 2), torch.empty(2, 5), 1.0, -1.0)
    return []


def _interpreter_dot_bf16_fix():
    """Triton 3.7's interpreter stores bf16 as uint16 and hands those raw bits to np.matmul
    in tl.dot (a GPU widens them to bf16 values); widen them to fp32 first, as the hardware
    does. Only the interpreter's dot is patched; the kernel is unchanged."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                            tl.float32)
        return h

    builder.create_dot = lambda self, a, b, d, *rest: dot(self, widen(a), widen(b), d, *rest)


def _child_interp():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(THIS))
    # fp32 -> bf16 stores round to nearest even on a GPU (cvt.rn) but truncate in the
    # interpreter: the CE kernel tests' patch makes the interpreter round like the GPU.
    from test_cross_entropy import _gpu_rounding_for_bf16
    _gpu_rounding_for_bf16()
    _interpreter_dot_bf16_fix()
    jobs = [(k, lambda kw=kw: _case(**kw)) for k, kw in CASES.items()] + [("empty", _empty_case)]
    return run_jobs(jobs)


def _child_aot():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    from thresher.kernels import lowrank as K
    return {str(cc): K.aot_compile_stats(cc) for cc in (80, 90)}



@pytest.fixture(scope="module")
def children():
    kids = {"interp": Child(THIS, ["interp"], True), "aot": Child(THIS, ["aot"], False)}
    yield kids
    for kid in kids.values():
        if kid.proc.poll() is None:
            kid.kill()
            kid.proc.communicate()


@pytest.mark.parametrize("case", list(CASES) + ["empty"])
def test_interpreter_case(children, case):
    problems = children["interp"].result()[case]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cc", ("80", "90"))
def test_aot_compiles_without_spills(children, cc):
    from thresher.kernels import lowrank as K  # the launch configs the stats must match

    stats = children["aot"].result()[cc]
    dtypes = ("fp32", "bf16", "fp16")
    kernels = ("moments", "moments_dsum", "update", "update_w0", "update_w1")
    assert {(s["kernel"], s["dtype"]) for s in stats} == {(k, d) for k in kernels for d in dtypes}
    assert len(stats) == len(kernels) * len(dtypes)
    want_warps = {"moments": K.MOMENTS_CONFIG["num_warps"], "update": K.UPDATE_CONFIG["num_warps"]}
    for s in stats:
        assert s["num_warps"] == want_warps[s["kernel"].split("_")[0]], s
    assert_compiled_cleanly(stats)


if __name__ == "__main__":
    result = _child_interp() if sys.argv[1] == "interp" else _child_aot()
    emit(result)
