"""Triton kernels of the compression ops (kernels/compress.py), without a GPU:

* numerics: in a child process with TRITON_INTERPRET=1 (set before triton is imported), the
  "triton" backend of every op runs on CPU tensors and must reproduce the reference backend
  bit for bit -- payload bytes, the updated error buffer, decoded values, counts;
* compilation: a second child AOT-compiles the kernels for sm_80 and sm_90 (float32 at the
  default launch configurations: ``aot_compile_stats(cc, full=False)``) and every kernel must
  compile with zero register spills.

Both children start together when the first test needs them (pattern of
tests/kernels/test_cross_entropy.py).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _children import Child, assert_compiled_cleanly, emit, run_jobs  # noqa: E402

THIS = os.path.abspath(__file__)

# Few chunks/blocks each: the interpreter runs programs one after another in numpy.
TOPK_CASES = {
    "fp32-default": dict(n=5000, k=64, chunk=4096, bits=2, dtype="fp32"),
    "bf16-small-chunks-4bit": dict(n=700, k=7, chunk=100, bits=4, dtype="bf16"),
    "fp16-fewer-than-k": dict(n=37, k=64, chunk=4096, bits=8, dtype="fp16"),
    "fp32-tiny-chunks-full-k": dict(n=20, k=5, chunk=5, bits=8, dtype="fp32"),
    "fp32-16bit-indices": dict(n=9000, k=33, chunk=5000, bits=8, dtype="fp32"),
    "fp32-no-error": dict(n=3000, k=16, chunk=1024, bits=2, dtype="fp32", error=False),
    "fp32-ties": dict(n=2048, k=50, chunk=1024, bits=2, dtype="fp32", ties=True),
}
QUANT_CASES = {
    "absmax-8": dict(n=3000, bits=8, block=256, scaling="absmax"),
    "meanstd-2-odd-block": dict(n=999, bits=2, block=100, scaling="meanstd"),
    "meanstd-4-tiny": dict(n=5, bits=4, block=256, scaling="meanstd"),
    "absmax-4-block4096": dict(n=4097, bits=4, block=4096, scaling="absmax"),
    "absmax-2-bf16-no-error": dict(n=1000, bits=2, block=128, scaling="absmax", dtype="bf16", error=False),
}


def _dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _equal(what, ref, got):
    import torch
    out = []
    for name, a, b in zip(("payload", "error", "decoded", "count"), ref, got):
        if a is None and b is None:
            continue
        if a.shape != b.shape or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape and a.numel() else "shape"
            out.append(f"{what}: {name} differs from the reference (max diff {diff})")
    return out


def _topk_case(n, k, chunk, bits, dtype, error=True, ties=False):
    import torch

    from thresher.ops import compress as C
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, generator=g)
    if ties:
        x = x.round()
    x = x.to(_dtype(dtype))
    e0 = torch.randn(n, generator=g) * 0.3 if error else None

    def run(be):
        e = None if e0 is None else e0.clone()
        p = C.topk_encode(x, e, k=k, chunk=chunk, bits=bits, backend=be)
        cnt = torch.zeros(n, dtype=torch.int32)
        out = torch.randn(n, generator=torch.Generator().manual_seed(1))
        d = C.topk_decode(p, n, k=k, chunk=chunk, bits=bits, out=out, count=cnt, backend=be)
        return p, e, d, cnt

    return _equal("topk", run("reference"), run("triton"))


def _quant_case(n, bits, block, scaling, dtype="fp32", error=True):
    import torch

    from thresher.ops import compress as C
    g = torch.Generator().manual_seed(n * bits)
    x = torch.randn(n, generator=g).to(_dtype(dtype))
    e0 = torch.randn(n, generator=g) * 0.3 if error else None

    def run(be):
        e = None if e0 is None else e0.clone()
        p = C.quantize_blockwise(x, e, bits=bits, block=block, scaling=scaling, backend=be)
        d = C.dequantize_blockwise(p, n, bits=bits, block=block, scaling=scaling, backend=be)
        return p, e, d

    return _equal("quant", run("reference"), run("triton"))


def _empty_case():
    import torch

    from thresher.ops import compress as C
    x = torch.empty(0)
    p = C.topk_encode(x, torch.empty(0), backend="triton")
    assert p.numel() == 0
    assert C.topk_decode(p, 0, backend="triton").numel() == 0
    assert C.quantize_blockwise(x, backend="triton").numel() == 0
    return []


def _child_interp():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    torch.set_num_threads(1)
    jobs = [("topk:" + k, lambda kw=kw: _topk_case(**kw)) for k, kw in TOPK_CASES.items()]
    jobs += [("quant:" + k, lambda kw=kw: _quant_case(**kw)) for k, kw in QUANT_CASES.items()]
    jobs += [("empty", _empty_case)]
    return run_jobs(jobs)


def _child_aot():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    from thresher.kernels import compress as K
    return {"stats": K.aot_compile_stats(80, full=False) + K.aot_compile_stats(90, full=False)}



@pytest.fixture(scope="module")
def children(request):
    names = {item.originalname for item in request.session.items if item.module is request.module}
    kids = {}
    if names & {"test_interpreter_case", "test_every_case_ran"}:
        kids["interp"] = Child(THIS, ["interp"], interpret=True)
    if "test_aot_compiles_without_spills" in names:
        kids["aot"] = Child(THIS, ["aot"], interpret=False)
    yield kids
    for kid in kids.values():
        if kid.proc.poll() is None:
            kid.kill()
            kid.proc.communicate()


ALL_CASES = ["topk:" + k for k in TOPK_CASES] + ["quant:" + k for k in QUANT_CASES] + ["empty"]


@pytest.mark.parametrize("case", ALL_CASES)
def test_interpreter_case(children, case):
    problems = children["interp"].result()[case]
    assert not problems, "\n".join(problems)


def test_every_case_ran(children):
    assert sorted(children["interp"].result()) == sorted(ALL_CASES)


def test_aot_compiles_without_spills(children):
    stats = children["aot"].result()["stats"]
    want = {("topk_encode", 4096), ("topk_decode", 64), ("quant_encode", 1024), ("quant_decode", 1024)}
    for cc in (80, 90):
        got = {(s["kernel"], s["block"]) for s in stats if s["cc"] == cc}
        assert got == want, (cc, got)
    assert_compiled_cleanly(stats)


if __name__ == "__main__":
    res = _child_interp() if sys.argv[1] == "interp" else _child_aot()
    emit(res)
