"""Shared machinery for the benchmark scripts in this folder.

Every ``bench_<family>.py`` script reuses these pieces:

* :func:`time_callable` -- warm-up, repeated timing, median / p20 / p80 (CUDA-synchronised);
* :func:`measure_peak_memory` -- peak memory a callable needs above what is resident when
  it starts (CPU: resident-set high-water mark from ``/proc``; CUDA: the caching allocator's
  peak);
* :func:`run_child` / :func:`child_main` -- run one measured case in a fresh Python
  process (the script re-executes itself with a hidden ``--child`` flag), so that neither
  memory left over by earlier cases nor the allocator's state can leak into a measurement;
* :func:`measure_copy_bandwidth` -- this machine's copy bandwidth (a large ``clone``), the
  ceiling memory-bound ops are reported against;
* :func:`collect_metadata` -- machine, CPU, cores, torch / thresher versions, git commit;
* :func:`markdown_table`, :func:`write_results` -- Markdown to stdout, CSV + JSON to
  ``--out`` (default ``bench-results/``).

Conventions: times are milliseconds, memory is bytes (MiB in tables), bandwidths are
10^9 bytes/s. The numbers on a shared, small CPU machine are noisy: compare implementations
as ratios measured in the same run, never against numbers from another run.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

MiB = 2**20
GiB = 2**30

# Public H100 SXM figures used for the GPU roofline estimates (see docs/architecture.md, "Benchmarks").
H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_DENSE_FLOP_PER_S = 990e12

# Datasheet peaks by device name (first match wins): HBM bytes/s and dense bf16 FLOP/s. The
# GPU benchmarks report achieved bandwidth / FLOP/s as a fraction of these. "H100 PCIe" and
# "H100 NVL" come before the plain "H100" (SXM) they contain.
DEVICE_PEAKS = (
    ("H200", 4.8e12, 990e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", H100_HBM_BYTES_PER_S, H100_BF16_DENSE_FLOP_PER_S),
    ("A100", 2.039e12, 312e12),
)


def device_peaks(name: str | None) -> dict:
    """``{"hbm_bytes_per_s", "bf16_flop_per_s", "source"}`` for a device name as
    ``torch.cuda.get_device_name`` gives it; None values for an unknown device or the CPU."""
    for key, bw, fl in DEVICE_PEAKS:
        if name and key.lower() in name.lower():
            return {"hbm_bytes_per_s": bw, "bf16_flop_per_s": fl, "source": f"{key} datasheet"}
    return {"hbm_bytes_per_s": None, "bf16_flop_per_s": None,
            "source": f"no datasheet peak for {name!r}"}


RESULT_MARKER = "@@THRESHER_BENCH_RESULT@@"
CHILD_FLAG = "--child"
# Environment of child processes: a fixed mmap threshold (which also turns off glibc's
# dynamic threshold) returns every freed block above 64 KiB to the OS at once, so the
# resident set goes back down between calls and the high-water mark measures one call.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Per-call times in milliseconds over ``n`` samples of ``inner`` calls each."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    mean_ms: float
    min_ms: float
    n: int
    inner: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], inner: int = 1) -> "Timing":
        return cls(
            median_ms=percentile(samples_ms, 50), p20_ms=percentile(samples_ms, 20),
            p80_ms=percentile(samples_ms, 80),
            mean_ms=sum(samples_ms) / len(samples_ms) if samples_ms else math.nan,
            min_ms=min(samples_ms) if samples_ms else math.nan, n=len(samples_ms), inner=inner,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """A no-op on CPU; ``torch.cuda.synchronize`` on CUDA (timings must include the work)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_callable(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 10,
                  min_sample_s: float = 0.02, device=None,
                  first_sample_ms: float | None = None, max_time_s: float | None = None,
                  min_repeats: int = 1) -> Timing:
    """Times ``fn()``. ``warmup`` untimed calls first; then ``repeats`` samples, each of
    ``inner`` back-to-back calls, ``inner`` chosen so that one sample lasts at least
    ``min_sample_s`` (short calls are otherwise dominated by timer and Python overhead).
    The result of ``fn`` is dropped after each call. ``first_sample_ms`` adds a sample
    already taken by the caller (e.g. the memory-measured call). ``max_time_s`` stops
    sampling once the samples add up to that long, as soon as ``min_repeats`` are taken
    (for calls far slower than expected). The garbage collector is off while timing."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = [] if first_sample_ms is None else [first_sample_ms]
    inner = 1
    if repeats > len(samples):
        # calibrate: one timed call decides how many calls make a sample
        t0 = time.perf_counter()
        fn()
        sync()
        one = time.perf_counter() - t0
        inner = max(1, math.ceil(min_sample_s / max(one, 1e-9))) if one < min_sample_s else 1
        if inner == 1:
            samples.append(one * 1e3)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        while len(samples) < repeats:
            if (max_time_s is not None and len(samples) >= max(1, min_repeats)
                    and sum(samples) * inner * 1e-3 >= max_time_s):
                break
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.from_samples(samples, inner)


def time_interleaved(calls: dict[str, Callable[[], Any]], *, repeats: int | dict[str, int],
                     min_sample_s: float = 0.02, device=None,
                     max_time_s: float | dict[str, float | None] | None = None,
                     min_repeats: int = 1,
                     first_samples_ms: dict[str, float] | None = None) -> dict[str, Timing]:
    """Times several callables round-robin: every round takes one sample of each (until it
    has its ``repeats``), so a change in the machine's load during the run (another
    process, thermal or frequency changes) hits all of them alike and their ratios stay
    meaningful. Call them once first (warm-up is the caller's business). Per callable,
    ``inner`` calls make one sample as in :func:`time_callable`; the first calibration call
    is a sample when ``inner`` is 1. ``max_time_s`` (per name or for all) stops a callable's
    sampling once its samples add up to that long and it has ``min_repeats``.
    ``first_samples_ms``: a sample already taken per name (e.g. the memory-measured call);
    it replaces the calibration call when it is at least ``min_sample_s`` long."""
    sync = synchronizer(device)
    reps = repeats if isinstance(repeats, dict) else {k: repeats for k in calls}
    limits = max_time_s if isinstance(max_time_s, dict) else {k: max_time_s for k in calls}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    inner: dict[str, int] = {}
    spent: dict[str, float] = {k: 0.0 for k in calls}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for k, fn in calls.items():
            given = (first_samples_ms or {}).get(k)
            if given is not None and given * 1e-3 >= min_sample_s:
                inner[k] = 1
                spent[k] += given * 1e-3
                samples[k].append(given)
                continue
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            one = time.perf_counter() - t0
            spent[k] += one
            inner[k] = max(1, math.ceil(min_sample_s / max(one, 1e-9))) if one < min_sample_s else 1
            if inner[k] == 1 and reps[k] > 0:
                samples[k].append(one * 1e3)

        def wants(k):
            if len(samples[k]) >= reps[k]:
                return False
            lim = limits.get(k)
            return not (lim is not None and len(samples[k]) >= max(1, min_repeats)
                        and spent[k] >= lim)

        while any(wants(k) for k in calls):
            for k, fn in calls.items():
                if not wants(k):
                    continue
                sync()
                t0 = time.perf_counter()
                for _ in range(inner[k]):
                    fn()
                sync()
                dt = time.perf_counter() - t0
                spent[k] += dt
                samples[k].append(dt * 1e3 / inner[k])
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: Timing.from_samples(samples[k], inner[k]) for k in calls}


def timed_call(fn: Callable[[], Any], device=None) -> tuple[Any, float]:
    """``(fn(), milliseconds)`` for one synchronised call."""
    sync = synchronizer(device)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    """Resets the kernel's resident-set high-water mark (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


class _RssSampler(threading.Thread):
    """Polls VmRSS every ``interval`` s (fallback where clear_refs is not permitted; PyTorch
    releases the GIL in its kernels, so the poller keeps running during them)."""

    def __init__(self, interval: float = 0.0005):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, current_rss_bytes() or 0
        self._stop_evt = threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, current_rss_bytes() or 0)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        self.peak = max(self.peak, current_rss_bytes() or 0)
        return self.peak


def measure_peak_memory(fn: Callable[[], Any], device=None) -> tuple[Any, int, str, float]:
    """Calls ``fn()`` once; returns ``(result, peak_extra_bytes, method, milliseconds)``.

    ``peak_extra_bytes`` is the peak memory during the call above what was in use just
    before it (so the inputs, allocated beforehand, are not counted, while outputs the call
    returns are). Methods, best first:

    * ``cuda-max-allocated``: ``torch.cuda.max_memory_allocated`` after a peak reset;
    * ``vmhwm``: Linux, VmHWM after resetting it through ``/proc/self/clear_refs``;
    * ``rss-poll``: Linux without that permission, VmRSS polled by a thread (may miss very
      short peaks);
    * ``ru_maxrss``: elsewhere; a lower bound (the mark cannot be reset, so only growth past
      the process's earlier peak shows). Use a fresh process per case (:func:`run_child`).
    CPU figures are page-granular and include allocator slack: compare them between
    implementations measured the same way, not against ``tensor.nbytes`` to the byte."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out, ms = timed_call(fn, device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - base), "cuda-max-allocated", ms
    base = current_rss_bytes()
    if base is not None and _reset_hwm():
        base = current_rss_bytes()
        out, ms = timed_call(fn)
        peak = (_proc_status_kib("VmHWM") or 0) * 1024
        return out, max(0, peak - base), "vmhwm", ms
    if base is not None:
        sampler = _RssSampler()
        sampler.start()
        try:
            out, ms = timed_call(fn)
        finally:
            peak = sampler.stop()
        return out, max(0, peak - base), "rss-poll", ms
    before = _ru_maxrss_bytes()
    out, ms = timed_call(fn)
    return out, max(0, _ru_maxrss_bytes() - before), "ru_maxrss", ms


# ----------------------------------------------------------------------------------------
# Child processes: one fresh interpreter per measured case
# ----------------------------------------------------------------------------------------


def run_child(script: str | Path, payload: dict, *, timeout: float = 900.0,
              extra_args: Sequence[str] = (), env: dict | None = None) -> dict:
    """Runs ``python script --child '<json payload>'`` in a fresh process and returns the
    dict the child passed to :func:`emit_result`. ``env``: variables to set for the child
    (a value of None removes the variable). Never raises: a crash, a timeout or a missing
    result comes back as ``{"error": "..."}``."""
    child_env = dict(os.environ)
    child_env.update(CHILD_ENV)
    for k, v in (env or {}).items():
        if v is None:
            child_env.pop(k, None)
        else:
            child_env[k] = v
    env = child_env
    cmd = [sys.executable, str(script), CHILD_FLAG, json.dumps(payload), *extra_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"child exited with {proc.returncode}: " + " | ".join(tail)[-400:]}


def emit_result(result: dict) -> None:
    """Child side of :func:`run_child` (one marked JSON line on stdout)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result, default=_json_default) + "\n")
    sys.stdout.flush()


def child_main(argv: Sequence[str], handler: Callable[[dict], dict]) -> bool:
    """If ``argv`` holds ``--child <json>``, runs ``handler(payload)``, emits its result
    (or the exception as ``{"error": ...}``) and returns True; otherwise returns False.
    Call it first thing in a script's ``main``."""
    if CHILD_FLAG not in argv:
        return False
    payload = json.loads(argv[argv.index(CHILD_FLAG) + 1])
    try:
        result = handler(payload)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which keeps going
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    emit_result(result)
    return True


# ----------------------------------------------------------------------------------------
# Machine: copy bandwidth and metadata
# ----------------------------------------------------------------------------------------


def measure_copy_bandwidth(nbytes: int = 256 * MiB, *, device=None, repeats: int = 5) -> dict:
    """Copy bandwidth of ``clone`` on a ``nbytes`` float32 tensor (far larger than any
    cache). Counted bytes = read + write = 2 * nbytes, the same accounting the op byte
    models use, so ``achieved / copy_gbps`` is the fraction of what this machine can move."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = time_callable(lambda: x.clone(), warmup=1, repeats=repeats, device=device)
    gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    return {"copy_gbps": gbps, "copy_gbps_p20": 2 * nbytes / (t.p80_ms * 1e-3) / 1e9,
            "copy_gbps_p80": 2 * nbytes / (t.p20_ms * 1e-3) / 1e9, "copy_bytes": nbytes,
            "copy_device": str(device)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def git_commit(path: str | Path | None = None) -> dict:
    """``{"git_commit": sha or None, "git_dirty": bool or None}`` for the repo holding path."""
    cwd = str(Path(path or __file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"git_commit": sha.stdout.strip(),
                "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}


def collect_metadata(device=None, **extra) -> dict:
    """Everything needed to interpret (and not over-interpret) a result file."""
    try:
        import thresher

        thresher_version = getattr(thresher, "__version__", "unknown")
        try:
            native = thresher.native_status()
        except Exception as exc:  # noqa: BLE001
            native = f"unavailable: {exc}"
    except Exception as exc:  # noqa: BLE001
        thresher_version, native = f"import failed: {exc}", None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    meta = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _mem_total_bytes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(device if device is not None else 0)
        if torch.cuda.is_available() else None,
        "thresher": thresher_version,
        "thresher_native": native if isinstance(native, (str, dict, list, type(None)))
        else str(native),
        **git_commit(),
    }
    meta.update(extra)
    return meta


# ----------------------------------------------------------------------------------------
# Output: Markdown, CSV, JSON
# ----------------------------------------------------------------------------------------


def _fmt(value, spec: str | Callable | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if callable(spec):
        return spec(value)
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple]) -> str:
    """``columns``: ``(key, header)`` or ``(key, header, format)`` where format is a format
    spec (``".2f"``) or a callable. Missing values print empty; '|' in cells is escaped."""
    cols = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in columns]
    body = [[_fmt(r.get(k), f).replace("|", "\\|") for k, _, f in cols] for r in rows]
    heads = [h for _, h, _ in cols]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]
    numeric = [all(_is_num(b[i]) for b in body if b[i]) and any(b[i] for b in body)
               for i in range(len(cols))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w)
                                 for c, w, n in zip(cells, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                         for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(heads), sep] + [line(b) for b in body])


def _is_num(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_results(out_dir: str | Path, name: str, rows: list[dict], meta: dict,
                  **sections) -> dict[str, Path]:
    """Writes ``<out>/<name>.csv`` (one line per row, union of keys, metadata columns
    ``git_commit``/``torch``/``thresher`` appended) and ``<out>/<name>.json``
    (``{"meta", "rows", **sections}``). Returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    meta_cols = {k: meta.get(k) for k in ("git_commit", "torch", "thresher", "cpu_model")}
    keys.extend(k for k in meta_cols if k not in keys)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**meta_cols, **{k: _csv_cell(v) for k, v in r.items()}})
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows, **sections}, f, indent=2, default=_json_default)
    return {"csv": csv_path, "json": json_path}


def _csv_cell(v):
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=_json_default)
    return v


# ----------------------------------------------------------------------------------------
# Small helpers shared by the scripts
# ----------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def add_common_args(parser: argparse.ArgumentParser, *, default_repeats: int = 10) -> None:
    """The flags every benchmark script takes (plus the hidden ``--child``)."""
    parser.add_argument("--repeats", type=int, default=default_repeats,
                        help="timed samples per case (fewer for slow cases; see the script)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case")
    parser.add_argument("--out", default="bench-results",
                        help="directory for the CSV/JSON results (default: %(default)s)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurements (and their child processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every case (default: torch's choice)")
    parser.add_argument(CHILD_FLAG, help=argparse.SUPPRESS)


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


def roofline_seconds(*, bytes_moved: float = 0.0, flops: float = 0.0,
                     bytes_per_s: float = H100_HBM_BYTES_PER_S,
                     flop_per_s: float = H100_BF16_DENSE_FLOP_PER_S) -> float:
    """Lower bound on a kernel's time: the larger of its memory and its compute time."""
    return max(bytes_moved / bytes_per_s, flops / flop_per_s)
