"""The layout of csrc/ (docs/architecture.md, "Layout"), read from the sources: every op family
has its declarations, kernels and bindings in cpu/ and in cuda/; common/ is maths that a plain
C++ compiler compiles, with no CUDA header or type; the module.cpp files only build their
module; each <unit>_bind.cpp binds only its own unit's entry points; and the file paths that
comments name exist. No build and no GPU needed (the header checks need a host C++ compiler).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
FAMILIES = ("cross_entropy", "lowrank", "compress")
BACKENDS = ("cpu", "cuda")
# Per family and backend: entry-point declarations, kernels, pybind11 bindings.
FAMILY_FILES = {"cpu": ("{}.h", "{}.cpp", "{}_bind.cpp"), "cuda": ("{}.h", "{}.cu", "{}_bind.cpp")}
# The files of cpu/ and cuda/ that belong to no family's three, and what each is for.
OTHER_FILES = {
    "cpu": {"module.cpp": "builds thresher._C", "clones.h": "ISA dispatch of the hot loops"},
    "cuda": {
        "module.cpp": "builds thresher._C_cuda",
        "runtime.h": "runtime_status and the launchers' shared checks",
        "runtime.cu": "their definitions (calls the CUDA runtime)",
        "runtime_bind.cpp": "binds runtime_status",
        "cross_entropy_device.cuh": "cross-entropy's per-thread sweeps (bf16/fp16 intrinsics)",
    },
}
# Units with a <unit>_bind.cpp and a register_<unit>() per backend directory.
BIND_UNITS = {"cpu": FAMILIES, "cuda": FAMILIES + ("runtime",)}

# CUDA headers, and what only nvcc knows: the 16-bit float types, the vector types, launch and
# stream types, and the kernel-only qualifiers and intrinsics.
CUDA_INCLUDE = re.compile(r'#\s*include\s*[<"](cuda[\w/.]*|cu\w+\.h|[\w/]*\.cuh)[>"]')
CUDA_ONLY = re.compile(
    r"\b(__nv_bfloat162?|nv_bfloat162?|__half2?|half2|(u?(char|short|int|long|longlong)|float|double)"
    r"[1-4]|make_\w+[1-4]|dim3|cuda\w*_t|__global__|__shared__|__syncthreads|__shfl\w*|__ld\w+|__st\w+)\b")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _strip_strings(code: str) -> str:
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', code)


def _comments(text: str) -> str:
    return "\n".join(re.findall(r"//([^\n]*)", text) + re.findall(r"/\*(.*?)\*/", text, flags=re.S))


def _files(backend: str) -> set[str]:
    return {p.name for p in (CSRC / backend).iterdir() if p.is_file()}


def _code(path: Path) -> str:
    return _strip_comments(path.read_text(encoding="utf-8"))


# ---- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_family_has_its_files(backend):
    have = _files(backend)
    missing = [f"{backend}/{pattern.format(fam)}" for fam in FAMILIES
               for pattern in FAMILY_FILES[backend] if pattern.format(fam) not in have]
    assert not missing, f"missing: {missing}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_file_outside_the_layout(backend):
    known = {p.format(fam) for fam in FAMILIES for p in FAMILY_FILES[backend]}
    known |= set(OTHER_FILES[backend])
    extra = sorted(_files(backend) - known)
    assert not extra, (f"{backend}/: {extra} belong to no family; add them to FAMILY_FILES or "
                       "OTHER_FILES (and docs/architecture.md's csrc/ tree)")


def test_common_holds_only_headers():
    assert {p.suffix for p in (CSRC / "common").iterdir()} == {".h"}


# ---- common/ and the declaration headers: plain C++ ----------------------------------------

HOST_HEADERS = (sorted((CSRC / "common").glob("*.h"))
                + [CSRC / b / f"{fam}.h" for b in BACKENDS for fam in FAMILIES]
                + [CSRC / "cuda" / "runtime.h"])


def _rel(path: Path) -> str:
    return str(path.relative_to(CSRC))


@pytest.mark.parametrize("header", HOST_HEADERS, ids=_rel)
def test_header_has_no_cuda_header_or_type(header):
    code = _code(header)
    assert not CUDA_INCLUDE.search(code), f"{_rel(header)} includes a CUDA header"
    found = sorted({m.group(0) for m in CUDA_ONLY.finditer(_strip_strings(code))})
    assert not found, f"{_rel(header)} uses what only nvcc knows: {found}"


@pytest.mark.parametrize("header", HOST_HEADERS, ids=_rel)
def test_header_compiles_with_the_host_compiler(header):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                          f"-I{CSRC}", "-x", "c++", "-"], input=f'#include "{_rel(header)}"\n',
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---- module.cpp: the module, nothing else --------------------------------------------------

MODULE_STATEMENT = re.compile(r'm\.doc\(\) = ""|m\.attr\(""\) = \w+|register_(\w+)\(m\)')
MODULE_OUTSIDE = re.compile(r"namespace py = pybind11|void register_\w+\(py::module_& m\)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_cpp_only_builds_the_module(backend):
    code = _strip_strings(_code(CSRC / backend / "module.cpp"))
    includes = re.findall(r"#\s*include\s*(\S+)", code)
    assert includes == ["<pybind11/pybind11.h>"], includes
    code = "\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith("#"))
    m = re.search(r"PYBIND11_MODULE\(\w+, m\) \{(.*)\}\s*$", code, flags=re.S)
    assert m, "no PYBIND11_MODULE(<name>, m) { ... } at the end of the file"
    registered = []
    for stmt in filter(None, (s.strip() for s in m.group(1).split(";"))):
        sm = MODULE_STATEMENT.fullmatch(stmt)
        assert sm, f"{backend}/module.cpp: {stmt!r} is not m.doc(), m.attr() or register_*(m)"
        if sm.group(1):
            registered.append(sm.group(1))
    outside = [s.strip() for s in code[:m.start()].split(";") if s.strip()]
    stray = [s for s in outside if not MODULE_OUTSIDE.fullmatch(s)]
    assert not stray, f"{backend}/module.cpp: {stray} (only register_* declarations belong here)"
    assert sorted(registered) == sorted(BIND_UNITS[backend]), registered


# ---- bindings: only in <unit>_bind.cpp, each its own unit's -------------------------------

BINDING = re.compile(r'm\.def\(\s*"(\w+)",\s*&(\w+)')


def _bindings(backend: str, unit: str) -> list[tuple[str, str]]:
    return BINDING.findall(_code(CSRC / backend / f"{unit}_bind.cpp"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_bind_files_and_module_use_pybind11(backend):
    allowed = {f"{u}_bind.cpp" for u in BIND_UNITS[backend]} | {"module.cpp"}
    users = {name for name in _files(backend)
             if re.search(r"pybind11|PYBIND11_|py::", _code(CSRC / backend / name))}
    assert users <= allowed, f"pybind11 outside the bindings: {sorted(users - allowed)}"


@pytest.mark.parametrize("backend,unit", [(b, u) for b in BACKENDS for u in BIND_UNITS[b]])
def test_bind_file_registers_only_its_unit(backend, unit):
    path = CSRC / backend / f"{unit}_bind.cpp"
    code = _code(path)
    includes = re.findall(r'#\s*include\s*"([^"]+)"', code)
    assert includes == [f"{backend}/{unit}.h"], f"{_rel(path)} includes {includes}"
    registers = re.findall(r"\bvoid (register_\w+)\(py::module_& m\)", code)
    assert registers == [f"register_{unit}"], registers
    bound = _bindings(backend, unit)
    assert bound, f"{_rel(path)} binds nothing"
    header = _code(CSRC / backend / f"{unit}.h")
    for name, fn in bound:
        assert fn == f"{name}_{backend}", f"{_rel(path)}: {name} binds {fn}, not {name}_{backend}"
        assert re.search(rf"\b{fn}\(", header), f"{fn} is not declared in {backend}/{unit}.h"


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_and_cuda_bind_the_same_names(family):
    names = {b: sorted(name for name, _ in _bindings(b, family)) for b in BACKENDS}
    assert names["cpu"] == names["cuda"], names


# ---- comments ------------------------------------------------------------------------------

PATH_IN_COMMENT = re.compile(r"(?<![\w/.<>-])((?:[\w.-]+/)+[\w.-]+\.(?:h|cuh|cpp|cu|py|md))\b")


def test_paths_named_in_comments_exist():
    missing = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in {".h", ".cuh", ".cpp", ".cu"}:
            continue
        for ref in PATH_IN_COMMENT.findall(_comments(path.read_text(encoding="utf-8"))):
            if not ((ROOT / ref).is_file() or (CSRC / ref).is_file()):
                missing.append(f"{_rel(path)}: {ref}")
    assert not missing, missing
