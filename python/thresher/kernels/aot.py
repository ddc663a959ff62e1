"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, on machines without
a GPU: the shared tooling behind every family's ``aot_compile_stats(cc)`` (the tests assert
zero register spills from it; docs/architecture.md, "Testing without a GPU"). Must run without
``TRITON_INTERPRET`` (the interpreter replaces the JIT functions)."""
from __future__ import annotations

__all__ = ["ptxas_usage", "require_compiled", "pointer_attrs", "compile_kernel"]


def ptxas_usage(ptx: str, cc: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on the kernel's PTX,
    with the flags Triton itself uses. Triton 3.7 only exposes ``n_regs``/``n_spills`` on a
    CompiledKernel after loading it onto a GPU (``_init_handles``), and discards the ptxas
    log it produced while compiling, so without a GPU we ask ptxas again."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(d, "k.o")],
            capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"cannot parse ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def require_compiled(kernel, module: str) -> None:
    """Raises unless ``kernel`` is a JIT function, i.e. ``module`` was imported without
    ``TRITON_INTERPRET`` (the interpreter's stand-ins cannot be compiled)."""
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError("aot_compile_stats needs the compiled (not interpreted) kernels: "
                           f"import {module} without TRITON_INTERPRET=1")


def pointer_attrs(fn, signature: dict, also=()) -> dict:
    """The JIT's divisibility specialisation for ``signature``: torch allocations are 16-byte
    aligned, so every pointer argument is 16-divisible; ``also`` names further arguments
    hinted the same way (row strides and sizes known to be multiples of 16)."""
    hinted = [k for k, t in signature.items() if t.startswith("*") or k in also]
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in hinted}


def compile_kernel(fn, signature: dict, constexprs: dict, attrs: dict, cc: int, options: dict):
    """``fn`` compiled for ``GPUTarget("cuda", cc, 32)`` (no GPU needed: Triton ships ptxas).
    Returns ``(compiled kernel, registers, spill store bytes, spill load bytes)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", int(cc), 32), options=options)
    return (k, *ptxas_usage(k.asm["ptx"], int(cc)))
