"""torch.compile(fullgraph=True) when the process's first thresher call is inside the compiled
function. Backend selection imports the native extensions and Triton lazily; dynamo cannot
trace ``importlib``, so selection must stay graph-safe on a cold process. Each case runs in
a fresh interpreter (an earlier eager call in this pytest process would have warmed every
cache), compiles with dynamo's ``eager`` backend (the failure is in tracing, not codegen),
and compares against the same call run eagerly afterwards.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CASES = {
    "weighted_cross_entropy": """
        x = torch.randn(2, 3, 11, generator=g); t = torch.randint(0, 11, (2, 3), generator=g)
        fn = lambda x, t: ops.weighted_cross_entropy(x, t, label_smoothing=0.1)
        args = (x, t)
    """,
    "linear_weighted_cross_entropy": """
        h = torch.randn(6, 8, generator=g); w = torch.randn(11, 8, generator=g)
        t = torch.randint(0, 11, (6,), generator=g)
        fn = lambda h, w, t: ops.linear_weighted_cross_entropy(h, w, t, reduction="sample")
        args = (h, w, t)
    """,
    "lowrank_adam_step": """
        def fn(p, grad, Q):
            m = torch.zeros(2, 6); v = torch.zeros(2, 6)
            ops.lowrank_adam_step(p, grad, Q, m, v, side="left", step=1, lr=1e-2, beta1=0.9,
                                  beta2=0.99, eps=1e-8)
            return p, m, v
        Q = torch.linalg.qr(torch.randn(8, 2, generator=g))[0]
        args = (torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), Q)
        clone = True
    """,
    "topk_encode_decode": """
        fn = lambda x: ops.topk_decode(ops.topk_encode(x, k=8, chunk=64), 1000, k=8, chunk=64)
        args = (torch.randn(1000, generator=g),)
    """,
    "quantize_dequantize_blockwise": """
        fn = lambda x: ops.dequantize_blockwise(ops.quantize_blockwise(x), 1000)
        args = (torch.randn(1000, generator=g),)
    """,
}

PROBE = """
import torch
import thresher.ops as ops
g = torch.Generator().manual_seed(0)
clone = False
{case}
copy = lambda a: tuple(t.clone() for t in a) if clone else a
got = torch.compile(fn, fullgraph=True, backend="eager")(*copy(args))
want = fn(*copy(args))
got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
for a, b in zip(got, want):
    torch.testing.assert_close(a, b)
print("compiled-first-call-ok")
"""


@pytest.mark.parametrize("op", list(CASES))
def test_first_call_inside_compiled_fullgraph(op):
    code = PROBE.format(case=textwrap.dedent(CASES[op]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=None)
    assert res.returncode == 0 and "compiled-first-call-ok" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-6000:]
