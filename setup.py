"""Build thresher's native extensions with pybind11 + ninja, without torch.

* ``thresher._C``      -- C++ CPU kernels (csrc/cpu/*.cpp), OpenMP, always attempted.
* ``thresher._C_cuda`` -- CUDA kernels (csrc/cuda/*.cu), only when nvcc is found and either
  ``THRESHER_CUDA=1`` or a CUDA build of torch is already importable. Missing nvcc is never
  an error. ``THRESHER_CUDA_ARCHS`` (default ``80;90``) picks the SM targets.

The extensions take raw pointers, shapes, strides and dtype codes from the Python layer
(python/thresher/ops), which is the one place that validates them; that is why no torch
header (and so no torch at build time) is needed.

A failed native build does not fail the install: the library then runs its reference
backend and says once, at import, why ``thresher._C`` is missing. Set
``THRESHER_STRICT_BUILD=1`` to turn a failed build into an error (CI does).

Environment:
  THRESHER_NATIVE=1      add -march=native (default: portable flags with runtime dispatch)
  THRESHER_CUDA=0|1      force the CUDA module off/on (default: auto-detect)
  THRESHER_CUDA_ARCHS    e.g. "80;90"
  MAX_JOBS               ninja parallelism
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "false", "no", "off")


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def _cuda_lib_dir(nvcc: str) -> str:
    """The folder holding libcudart_static.a for this nvcc. nvcc may be a wrapper script
    (e.g. /usr/local/bin/nvcc), so ask nvcc itself: its dry run prints the -L paths it links
    with. Falls back to <CUDA root>/lib64."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "LIBRARIES=" in line:
                for tok in shlex.split(line.split("LIBRARIES=", 1)[1]):
                    d = tok[2:] if tok.startswith("-L") else ""
                    if d and os.path.exists(os.path.join(d, "libcudart_static.a")):
                        return os.path.normpath(d)
    except Exception:  # noqa: BLE001 - fall back to the usual layout
        pass
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or \
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return os.path.join(home, "lib64")


def _torch_has_cuda() -> bool:
    # Only a probe: torch is not required to build. Run in a subprocess so a broken torch
    # cannot break the build.
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(int(torch.version.cuda is not None))"],
            capture_output=True, text=True, timeout=120,
        )
        return out.stdout.strip() == "1"
    except Exception:
        return False


def _pybind11_include() -> str:
    import pybind11

    return pybind11.get_include()


class NinjaExtension(Extension):
    def __init__(self, name: str, sources: list[str], kind: str):
        super().__init__(name, sources=sources)
        self.kind = kind  # "cpu" or "cuda"


class NinjaBuildExt(build_ext):
    """Writes one build.ninja per extension and runs ninja (parallel, incremental)."""

    def build_extensions(self) -> None:
        strict = _env_flag("THRESHER_STRICT_BUILD") is True
        for ext in self.extensions:
            try:
                self._build_one(ext)
            except Exception as exc:  # noqa: BLE001 - reported, then the reference path runs
                if strict:
                    raise
                print(f"thresher: building {ext.name} failed ({exc}); "
                      "the library will run without it", file=sys.stderr)

    def _build_one(self, ext: NinjaExtension) -> None:
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        build_dir = os.path.abspath(os.path.join(self.build_temp, ext.name.replace(".", "_")))
        os.makedirs(build_dir, exist_ok=True)

        py_inc = sysconfig.get_paths()["include"]
        includes = [f"-I{py_inc}", f"-I{_pybind11_include()}", f"-I{os.path.join(ROOT, 'csrc')}"]
        cxx = os.environ.get("CXX", "c++")
        cxxflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp",
                    "-fno-math-errno", "-ffp-contract=fast", "-Wall", "-Wno-unknown-pragmas"]
        if _env_flag("THRESHER_NATIVE"):
            cxxflags.append("-march=native")
        ldflags = ["-shared", "-fopenmp"]
        nvcc = _find_nvcc() if ext.kind == "cuda" else None
        if nvcc:
            # Static cudart: the module then needs no libcudart.so.N at run time (CUDA torch
            # wheels bundle their own, of another version), and --exclude-libs keeps its
            # symbols private so they cannot bind to a global cudart that torch loaded.
            ldflags += [f"-L{_cuda_lib_dir(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread",
                        "-Wl,--exclude-libs,ALL"]

        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cxxflags = {' '.join(includes + cxxflags)}",
            f"ldflags = {' '.join(ldflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cxx $in $ldflags -o $out",
        ]
        if nvcc:
            archs = os.environ.get("THRESHER_CUDA_ARCHS", "80;90").replace(",", ";")
            gencode = " ".join(
                f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";") if a.strip()
            )
            lines += [
                f"nvcc = {nvcc}",
                f"nvccflags = {' '.join(includes)} -O3 -std=c++17 --use_fast_math "
                f"-Xcompiler -fPIC -Xcompiler -fvisibility=hidden {gencode}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
            ]

        objects = []
        for src in ext.sources:
            src_abs = os.path.join(ROOT, src)
            obj = os.path.join(build_dir, src.replace("/", "_") + ".o")
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            lines.append(f"build {_esc(obj)}: {rule} {_esc(src_abs)}")
            objects.append(obj)
        lines.append(f"build {_esc(out_path)}: link {' '.join(_esc(o) for o in objects)}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")

        cmd = [_ninja(), "-C", build_dir]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        print("thresher: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


def _esc(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja() -> str:
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise RuntimeError("ninja not found (pip install ninja)")
        return found


def _extensions() -> list[NinjaExtension]:
    exts = [NinjaExtension("thresher._C", sorted(_rel(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))), "cpu")]
    want_cuda = _env_flag("THRESHER_CUDA")
    nvcc = _find_nvcc()
    if want_cuda is not False and nvcc is not None and (want_cuda or _torch_has_cuda()):
        cu = sorted(_rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu"))))
        cc = sorted(_rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cpp"))))
        exts.append(NinjaExtension("thresher._C_cuda", cu + cc, "cuda"))
    return exts


def _rel(paths: list[str]) -> list[str]:
    return [os.path.relpath(p, ROOT) for p in paths]


setup(ext_modules=_extensions(), cmdclass={"build_ext": NinjaBuildExt})
