#!/usr/bin/env bash
# One unattended GPU check of thresher (docs/gpu.md): build the CUDA extension, run the CUDA
# tests, the GPU benchmarks and a single-process LoRDO/NCCL smoke run, and write
# OUTDIR/gpu_report.md + OUTDIR/gpu_report.json (re-rendered after every stage, so a run cut
# short keeps what finished). Each stage has its own time cap, and the caps are trimmed so the
# whole run ends inside --budget-s (default 530 s: the 9 minutes the check may take, less
# room for the report).
#
#   benchmarks/gpu_check.sh OUTDIR [--dry-run | --device cpu|cuda] [--budget-s N]
#
# --dry-run (= --device cpu): the same stages on the CPU with tiny sizes and the installed
# build (no reinstall), in well under 2 minutes; tests/test_gpu_check.py runs it in CI.
# Peers (Liger-Kernel, cut-cross-entropy, galore-torch) and a newer setuptools come as wheels
# from .whl/ (benchmarks/fetch_gpu_wheels.sh downloads them); a missing peer is reported.
set -u

usage() { echo "usage: $0 OUTDIR [--dry-run | --device cpu|cuda] [--budget-s N]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
case $OUT in -*) usage ;; esac
DEVICE=cuda
BUDGET=530
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DEVICE=cpu ;;
    --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift ;;
    --budget-s) [ $# -ge 2 ] || usage; BUDGET=$2; shift ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
case $DEVICE in cpu|cuda) ;; *) echo "--device must be cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac
case $BUDGET in ''|*[!0-9]*) echo "--budget-s must be a whole number of seconds" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
: > "$OUT/stages.jsonl"
RESERVE=10  # seconds kept for the last render

# stage NAME CAP_S NOTE CMD...: runs CMD under `timeout` with the smaller of CAP_S and what is
# left of the budget, logs to OUT/NAME.log, appends a line to stages.jsonl, re-renders.
stage() {
  local name=$1 cap=$2 note=$3; shift 3
  local left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  [ "$cap" -gt "$left" ] && cap=$left
  local t0 rc status
  t0=$(date +%s)
  if [ "$cap" -lt 5 ]; then
    rc=124; status="skipped: out of budget (${BUDGET} s)"
  else
    echo "== $name (cap ${cap} s)" >&2
    timeout -k 5 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out after ${cap} s" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "cap_s": %d, "note": "%s"}\n' \
    "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$cap" "$note" >> "$OUT/stages.jsonl"
  echo "   $name: $status" >&2
  "$PY" "$ROOT/benchmarks/gpu_report.py" render "$OUT" > /dev/null 2>&1
  return $rc
}

skip() {  # skip NAME REASON
  printf '{"stage": "%s", "status": "skipped: %s", "rc": 0, "seconds": 0, "cap_s": 0, "note": ""}\n' \
    "$1" "$2" >> "$OUT/stages.jsonl"
  echo "   $1: skipped: $2" >&2
}

cd "$ROOT" || exit 2

# 1. wheels: into a private folder on PYTHONPATH (the image's own packages stay untouched)
if ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
  SITE=${THRESHER_GPU_SITE:-/tmp/thresher-gpu-site}
  stage wheels 60 "$(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/" \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"/.whl/*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  skip wheels "no .whl/ folder (benchmarks/fetch_gpu_wheels.sh makes one); peers may be missing"
fi

# 2. build: against the machine's own torch, without build isolation (it cannot download)
if [ "$DEVICE" = cuda ]; then
  stage build 240 "THRESHER_CUDA=1 THRESHER_CUDA_ARCHS=${THRESHER_CUDA_ARCHS:-90}" \
    env THRESHER_CUDA=1 THRESHER_CUDA_ARCHS="${THRESHER_CUDA_ARCHS:-90}" THRESHER_STRICT_BUILD=1 \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install -v --no-build-isolation --no-deps -e "$ROOT"
else
  stage build 30 "dry run: checks the installed build, does not reinstall" \
    "$PY" -c "import thresher, thresher._C; from thresher.ops import native_status; print(native_status())"
fi

# 3. env (after the build: it records native_status())
stage env 45 "device $DEVICE" "$PY" "$ROOT/benchmarks/gpu_report.py" env "$OUT"

# 4. tests: the device suite's CUDA cases (they must run: THRESHER_TEST_DEVICES makes a
# missing device or backend fail instead of skipping)
if [ "$DEVICE" = cuda ]; then
  # Triton compiles each kernel variant on first use: several workers compile in parallel
  XDIST=()
  "$PY" -c "import xdist" 2> /dev/null && XDIST=(-n "${THRESHER_TEST_WORKERS:-8}")
  stage tests 150 "tests/devices, cuda cases${XDIST[*]:+, pytest ${XDIST[*]}}" \
    env THRESHER_TEST_DEVICES=cuda COLUMNS=250 "$PY" -m pytest -q -p no:cacheprovider --maxfail=30 \
    "${XDIST[@]}" --junitxml="$OUT/tests.xml" tests/devices
else
  stage tests 60 "dry run: a float32 slice of tests/devices on cpu" \
    env THRESHER_TEST_DEVICES=cpu OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" tests/devices/test_optim_devices.py \
    tests/devices/test_compress_devices.py -k "float32"
fi

# 5. LoRDO, one process, NCCL on CUDA (gloo on the CPU); before the
# benchmarks, so a long benchmark cannot starve it
stage lordo_nccl 45 "world size 1, top-k compressed sync" \
  "$PY" "$ROOT/benchmarks/gpu_report.py" lordo-smoke "$OUT" --device "$DEVICE"

# 6. benchmarks
if [ "$DEVICE" = cuda ]; then
  CE_ARGS=(--n 8192 --v 32000 128256 --base-n 8192 --base-v 32000 --dtype bf16
           --modes fwd+bwd --memory inprocess --mem-limit-gb 100 --repeats 5)
  COMP_ARGS=(--numel $((64 * 1024 * 1024)) --repeats 5 --no-error-table)
else
  CE_ARGS=(--n 256 --v 2000 --base-n 256 --base-v 2000 --dtype fp32 --modes fwd+bwd
           --memory inprocess --repeats 2
           --impls thresher eager liger-kernel cut-cross-entropy F.linear_cross_entropy)
  COMP_ARGS=(--numel $((1 << 18)) --repeats 2 --no-error-table)
fi
# the two ops in two runs: one that overruns its cap cannot take the other's results with it
stage bench_cross_entropy 90 "weighted CE vs eager, torch.compile, Liger-Kernel" \
  "$PY" benchmarks/bench_cross_entropy.py --device "$DEVICE" --no-gpu-section --no-headline \
  --only ce "${CE_ARGS[@]}" --out "$OUT/bench_cross_entropy/ce"
stage bench_linear_cross_entropy 120 \
  "fused linear CE vs eager, torch.compile, Liger-Kernel, cut-cross-entropy, F.linear_cross_entropy" \
  "$PY" benchmarks/bench_cross_entropy.py --device "$DEVICE" --no-gpu-section --no-headline \
  --only linear "${CE_ARGS[@]}" --out "$OUT/bench_cross_entropy/linear"
stage bench_compress 60 "vs plain PyTorch, PowerSGD's maths and powerSGD_hook" \
  "$PY" benchmarks/bench_compress.py --device "$DEVICE" "${COMP_ARGS[@]}" \
  --out "$OUT/bench_compress"
if [ ! -f benchmarks/bench_lowrank.py ]; then
  skip bench_lowrank "benchmarks/bench_lowrank.py is absent"
elif ! "$PY" benchmarks/bench_lowrank.py --help 2>/dev/null | grep -q -- "--device"; then
  skip bench_lowrank "bench_lowrank.py has no --device option in this checkout"
else
  stage bench_lowrank 90 "--device $DEVICE --quick" \
    "$PY" benchmarks/bench_lowrank.py --device "$DEVICE" --quick --out "$OUT/bench_lowrank"
fi

"$PY" "$ROOT/benchmarks/gpu_report.py" render "$OUT" || exit 1
echo "wrote $OUT/gpu_report.md and $OUT/gpu_report.json ($(( $(date +%s) - START )) s)" >&2
# exit status: 0 when every stage ran (or was skipped for a stated reason) and passed
! grep -q '"status": "\(failed\|timed out\|skipped: out of budget\)' "$OUT/stages.jsonl"
