"""GPU readiness without a GPU: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90
with no register spills, and the whole thresher._C_cuda module builds, links and imports.

Each .cu file is compiled once per architecture (module-scoped fixture, the architectures in
parallel) with the flags setup.py uses plus ``-Xptxas -v``; the per-kernel register and spill
report is printed (``pytest -s``). Skipped only where nvcc is absent.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
HOST_ONLY = {"runtime.cu"}  # the launchers' shared runtime calls: no kernels
ARCHS = ("80", "90")


def _find_nvcc() -> str | None:
    # the search order of setup.py's _find_nvcc
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: set CUDA_HOME or put nvcc on PATH to compile csrc/cuda")


def _includes() -> list[str]:
    import pybind11

    return [f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
            f"-I{os.path.join(ROOT, 'csrc')}"]


# setup.py's nvccflags, for one architecture
def _nvcc_cmd(src: str, arch: str, out: str) -> list[str]:
    return [NVCC, *_includes(), "-O3", "-std=c++17", "--use_fast_math", "-Xcompiler", "-fPIC",
            "-Xcompiler", "-fvisibility=hidden", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas", "-v", "-c", src, "-o", out]


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def _parse_ptxas(text: str) -> list[dict]:
    """One dict per compiled entry function: name, arch, registers, stack, spill_stores,
    spill_loads."""
    kernels, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    names = _demangle([k["name"] for k in kernels])
    for k in kernels:
        k["name"] = names[k["name"]]
    return kernels


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """{(file, arch): (returncode, output, kernels)}, each file compiled once per arch."""
    if NVCC is None:
        pytest.skip("nvcc not found: set CUDA_HOME or put nvcc on PATH to compile csrc/cuda")
    out_dir = tmp_path_factory.mktemp("nvcc")

    def compile_one(job):
        src, arch = job
        obj = str(out_dir / f"{os.path.basename(src)}.sm_{arch}.o")
        res = subprocess.run(_nvcc_cmd(src, arch, obj), capture_output=True, text=True)
        text = res.stdout + res.stderr
        return job, (res.returncode, text, _parse_ptxas(text))

    jobs = [(src, arch) for src in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return dict(pool.map(compile_one, jobs))


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


@needs_nvcc
def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/*.cu is empty"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES, ids=_rel)
def test_nvcc_compiles_without_spills(nvcc_results, src, arch):
    rc, text, kernels = nvcc_results[(src, arch)]
    assert rc == 0, f"nvcc failed for {_rel(src)} (sm_{arch}):\n{text}"
    ours = [ln for ln in text.splitlines() if "warning" in ln.lower() and "csrc" in ln]
    assert not ours, "nvcc warnings:\n" + "\n".join(ours)
    if os.path.basename(src) in HOST_ONLY:
        assert not kernels, f"{_rel(src)} is host code only, but has kernels: {kernels}"
        return
    assert kernels, f"ptxas reported no entry function for {_rel(src)} (sm_{arch}):\n{text}"
    print(f"\n{_rel(src)} sm_{arch}:")
    for k in kernels:
        assert k.get("arch") == f"sm_{arch}"
        assert "spill_stores" in k and "registers" in k, f"unparsed ptxas report for {k['name']}"
        print(f"  {k['registers']:3d} regs  stack {k['stack']:4d} B  spills "
              f"{k['spill_stores']}/{k['spill_loads']} B  {k['name']}")
    spilled = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    assert not spilled, "register spills:\n" + "\n".join(
        f"{k['name']}: {k['spill_stores']} B stores, {k['spill_loads']} B loads" for k in spilled)


@needs_nvcc
def test_ce_kernels_are_all_instantiated(nvcc_results):
    src = os.path.join(ROOT, "csrc", "cuda", "cross_entropy.cu")
    for arch in ARCHS:
        names = [k["name"] for k in nvcc_results[(src, arch)][2]]
        for kind in ("ce_forward_kernel", "ce_backward_kernel"):
            for code in (0, 2, 3):  # float32, bfloat16, float16
                assert any(f"{kind}<{code}>" in n for n in names), (kind, code, arch, names)


# ---- the whole extension: setup.py's NinjaBuildExt with THRESHER_CUDA=1 ---------------------


@pytest.fixture(scope="module")
def built_cuda_module(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found: set CUDA_HOME or put nvcc on PATH to compile csrc/cuda")
    d = tmp_path_factory.mktemp("cuda_build")
    lib, tmp = d / "lib", d / "tmp"
    env = dict(os.environ, THRESHER_CUDA="1", THRESHER_STRICT_BUILD="1")
    res = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"THRESHER_CUDA=1 build failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"
    found = glob.glob(str(lib / "thresher" / "_C_cuda*.so"))
    assert found, f"no thresher/_C_cuda*.so under {lib}:\n{res.stderr[-4000:]}"
    return lib, found[0]


@needs_nvcc
def test_cuda_module_links_and_imports(built_cuda_module):
    lib, so = built_cuda_module
    probe = r"""
import importlib.util, re, sys
spec = importlib.util.spec_from_file_location("_C_cuda", sys.argv[1])  # this build, by path
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)

def params(f):
    return re.findall(r"(\w+):", f.__doc__.splitlines()[0].split("(", 1)[1].rsplit(")", 1)[0])

try:
    import thresher._C as cpu  # the CPU twin: same names, num_threads in place of stream
except Exception:
    cpu = None
for name in ("ce_forward", "ce_backward"):
    p = params(getattr(m, name))
    assert p[-1] == "stream", p
    if cpu is not None:
        assert params(getattr(cpu, name))[:-1] == p[:-1], (name, params(getattr(cpu, name)), p)
# argument errors are raised before any CUDA call (safe with or without a GPU)
for call in (lambda: m.ce_forward(0, 1, 8, 8, 1, 0, 0, 0, 0, 0, 0, -100, 0.0, 0.0, 0.0, 0),
             lambda: m.ce_forward(0, 1, 8, 8, 0, 0, 0, 0, 16, 8, 0, -100, 0.0, 0.0, 0.0, 0),
             lambda: m.ce_backward(0, 1, 0, 8, 0, 0, 0, 0, 0, 8, -100, 0.0, 0.0, 0.0, 0)):
    try:
        call()
    except ValueError:
        pass
    else:
        raise AssertionError("no ValueError")
m.ce_forward(0, 0, 8, 8, 0, 0, 0, 0, 0, 0, 0, -100, 0.0, 0.0, 0.0, 0)  # no rows: nothing to do
status = m.runtime_status()
assert isinstance(status, str)
print("runtime_status:", repr(status))
print("ok", "with-cpu-twin" if cpu is not None else "no-cpu-twin")
"""
    res = subprocess.run([sys.executable, "-c", probe, so], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
    print("\n" + res.stdout)


@needs_nvcc
def test_cuda_module_keeps_cudart_private(built_cuda_module):
    """cudart is linked statically and hidden: no libcudart.so.N needed at run time, and no
    cuda* symbol exported that could clash with the cudart a CUDA torch loads."""
    _, so = built_cuda_module
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils nm not found")
    syms = subprocess.run([nm, "-D", "--defined-only", so], capture_output=True, text=True).stdout
    exported = [ln.split()[-1] for ln in syms.splitlines() if ln.strip()]
    assert "PyInit__C_cuda" in exported
    leaked = [s for s in exported if s.lower().startswith(("cuda", "__cuda", "cu"))]
    assert not leaked, leaked
    readelf = shutil.which("readelf")
    if readelf:
        dyn = subprocess.run([readelf, "-d", so], capture_output=True, text=True).stdout
        assert "libcudart" not in dyn, dyn
