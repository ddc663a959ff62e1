"""kernels/aot.py, the AOT tooling every family's aot_compile_stats uses: the parts that need
no compiler (the compiles themselves run in the children of test_{cross_entropy,lowrank,
compress}.py)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from thresher.kernels import aot


class _Fn:  # what pointer_attrs reads of a JIT function
    arg_names = ["x_ptr", "x_stride", "out_ptr", "V", "BLOCK"]


def test_pointer_attrs_hints_pointers_and_the_named_arguments():
    sig = {"x_ptr": "*fp32", "x_stride": "i32", "out_ptr": "*bf16", "V": "i32", "BLOCK": "constexpr"}
    hint = [["tt.divisibility", 16]]
    assert aot.pointer_attrs(_Fn, sig) == {(0,): hint, (2,): hint}
    assert aot.pointer_attrs(_Fn, sig, ("x_stride", "V")) == {(0,): hint, (1,): hint, (2,): hint,
                                                               (3,): hint}


def test_require_compiled_refuses_a_plain_function():
    # in a child: importing triton here would fix TRITON_INTERPRET for the whole session
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs the triton package")
    code = ("import pytest\nfrom thresher.kernels import aot\n"
            "with pytest.raises(RuntimeError, match='without TRITON_INTERPRET=1'):\n"
            "    aot.require_compiled(lambda: None, 'thresher.kernels.example')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
