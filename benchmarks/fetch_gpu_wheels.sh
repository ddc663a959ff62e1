#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that has none: the peers that its image lacks and a setuptools new enough for this
# project's pyproject.toml (PEP 639 license string: setuptools >= 77). The folder is ignored
# by git (.gitignore); it travels as a carried path (docs/gpu.md).
#
#   benchmarks/fetch_gpu_wheels.sh [--dest DIR] [--python-version 3.12] [--dry-run]
#
# --dest defaults to .whl/ at the repository root (where gpu_check.sh and the device call's
# carry look); --python-version is the GPU machine's (3.12 there, docs/gpu.md).
#
# Not fetched: bitsandbytes (galore-torch imports it; its wheel alone is larger than what a
# device call may carry), and anything the image already has (torch, triton, transformers,
# pybind11, ninja): see docs/gpu.md.
set -eu

DEST="$(cd "$(dirname "$0")/.." && pwd)/.whl"  # the repository root's, whatever the cwd
PYVER=3.12
DRY=0
usage() { echo "usage: $0 [--dest DIR] [--python-version X.Y] [--dry-run]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --dest) [ $# -ge 2 ] || usage; DEST=$2; shift ;;
    --python-version) [ $# -ge 2 ] || usage; PYVER=$2; shift ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
case $PYVER in [0-9].[0-9]|[0-9].[0-9][0-9]) ;; *) echo "--python-version must look like 3.12, got $PYVER" >&2; exit 2 ;; esac

# One version each (two of one package stop the install there).
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 galore-torch==1.0 setuptools==84.2.1)
PLATFORMS=()
for n in 39 35 34 31 28 27 24 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
CMD=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER"
     --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
mkdir -p "$DEST"
"${CMD[@]}"
du -sh "$DEST"
