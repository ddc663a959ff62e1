#!/usr/bin/env python
"""Helpers of benchmarks/gpu_check.sh (one file, three subcommands):

* ``env OUT``: the machine -- device name and its peak HBM bandwidth / bf16 rate
  (``_common.device_peaks``), torch / CUDA / Triton versions, the peers that import (Liger-
  Kernel, cut-cross-entropy, galore-torch) and why the others do not, thresher's native
  status -- into ``OUT/env.json``;
* ``lordo-smoke OUT --device cuda|cpu``: a single-process LoRDO run (world size 1; NCCL on
  CUDA, gloo on CPU) with a top-k compressed sync: 24 steps of a small regression, loss must
  be finite and fall; writes ``OUT/lordo_smoke.json``;
* ``render OUT``: ``OUT/gpu_report.md`` + ``OUT/gpu_report.json`` from what the stages left
  (``stages.jsonl``, ``env.json``, ``tests.xml``, the benchmarks' JSON). The script calls it
  after every stage, so a run cut short still leaves a report of what finished.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEERS = {"Liger-Kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
         "galore-torch": "galore_torch"}
# Stage names in the order the script runs them (the report lists every one, run or not).
STAGES = ("wheels", "build", "env", "tests", "lordo_nccl", "bench_cross_entropy",
          "bench_linear_cross_entropy", "bench_compress", "bench_lowrank")


def _peer_status() -> dict:
    out = {}
    for name, mod in PEERS.items():
        try:
            m = importlib.import_module(mod)
            out[name] = {"ok": True, "version": getattr(m, "__version__", None),
                         "path": os.path.dirname(getattr(m, "__file__", "") or "")}
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            out[name] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def cmd_env(out: Path) -> int:
    import torch

    import _common as C

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"not importable: {type(exc).__name__}: {exc}"[:200]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_bytes=p.total_memory)
    else:
        info["device"] = "cpu"
    info["peaks"] = C.device_peaks(info["device"])
    try:  # driver and clocks, as the driver reports them
        import subprocess
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"n/a: {type(exc).__name__}"
    info["peers"] = _peer_status()
    try:
        from thresher.ops import native_status
        info["thresher_native"] = native_status()
    except Exception as exc:  # noqa: BLE001
        info["thresher_native"] = f"thresher not importable: {type(exc).__name__}: {exc}"
    (out / "env.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


def cmd_lordo_smoke(out: Path, device: str, steps: int = 24) -> int:
    import torch
    import torch.distributed as dist

    from thresher.optim import LoRDO
    from thresher.comm.collectives import free_port

    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60),
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 64, generator=g).to(dev)
        y = x @ torch.randn(64, 32, generator=g).to(dev) * 0.3
        net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                  torch.nn.Linear(128, 32)).to(dev)
        opt = LoRDO(net.parameters(), lr=0.01, rank=8, sync_every=4, compression="topk",
                    compression_options=dict(k=16, chunk=256, bits=2))
        losses, t0 = [], time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / steps
    finally:
        dist.destroy_process_group()
    ok = all(map(lambda v: v == v and abs(v) != float("inf"), losses)) and losses[-1] < losses[0]
    res = {"device": str(dev), "process_group": backend, "steps": steps, "ms_per_step": ms,
           "first_loss": losses[0], "last_loss": losses[-1], "ok": ok,
           "syncs": steps // 4, "codec": "topk k=16 chunk=256 2-bit"}
    (out / "lordo_smoke.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------
# render
# ----------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - absent or cut short: the stage table says why
        return None


def _stages(out: Path) -> dict:
    rows = {}
    p = out / "stages.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[r["stage"]] = r
    return rows


def _tests(out: Path) -> dict | None:
    p = out / "tests.xml"
    if not p.exists():
        return None
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as exc:
        return {"error": f"tests.xml unreadable: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                              "skipped")}
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    failed = []
    for tc in root.iter("testcase"):
        bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if bad is not None:
            why = (bad.get("message") or "").strip().splitlines()
            failed.append(f"{tc.get('classname')}::{tc.get('name')}"
                          + (f": {why[0][:200]}" if why else ""))
    tot["failed_cases"] = failed[:40]
    return tot


def _bench_rows(out: Path, sub: str) -> list[dict]:
    rows = []
    for p in sorted((out / sub).rglob("*.json")) if (out / sub).is_dir() else []:
        d = _read_json(p)
        if isinstance(d, dict):
            rows.extend(r for r in d.get("rows", []) if isinstance(r, dict))
    return rows


def _fmt(v, spec=".2f"):
    if v is None or v == "":
        return ""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _table(rows, cols) -> list[str]:
    if not rows:
        return ["(no rows)"]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), s) for k, _, s in cols) + " |")
    return lines


CE_COLS = [("op_name", "op", ""), ("impl", "impl", ""), ("dtype", "dtype", ""), ("N", "N", ""),
           ("V", "V", ""), ("mode", "mode", ""), ("median_ms", "median ms", ".3f"),
           ("speedup_vs_eager", "vs eager", ".2f"), ("peak_mib", "peak MiB", ".0f"),
           ("frac_peak_bw", "of peak HBM", ".0%"), ("frac_peak_flops", "of peak bf16", ".0%"),
           ("status", "status", "")]
COMPRESS_COLS = [("impl", "impl", ""), ("numel", "numel", ""), ("encode_ms", "encode ms", ".3f"),
                 ("encode_vs_plain", "vs plain", ".2f"), ("decode_ms", "decode ms", ".3f"),
                 ("peak_mib", "peak MiB", ".0f"), ("encode_frac_peak_bw", "of peak HBM", ".0%")]


def cmd_render(out: Path) -> int:
    stages = _stages(out)
    env = _read_json(out / "env.json") or {}
    tests = _tests(out)
    ce = _bench_rows(out, "bench_cross_entropy")
    comp = [r for r in _bench_rows(out, "bench_compress") if r.get("section") == "throughput"]
    lowrank = _bench_rows(out, "bench_lowrank")
    smoke = _read_json(out / "lordo_smoke.json")
    rows = [stages.get(s, {"stage": s, "status": "not run"}) for s in STAGES]
    for r in rows:  # the reason a stage failed travels in the report (its log may not)
        log = out / f"{r['stage']}.log"
        if not r["status"].startswith(("ok", "skipped", "not run")) and log.exists():
            r["log_tail"] = log.read_text(errors="replace").splitlines()[-30:]
    report = {"stages": rows,
              "env": env, "tests": tests, "bench_cross_entropy": ce, "bench_compress": comp,
              "bench_lowrank": lowrank, "lordo_smoke": smoke,
              "rendered_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str))

    md = [f"# thresher GPU check: {env.get('device', '?')}", ""]
    peaks = env.get("peaks") or {}
    bw, fl = peaks.get("hbm_bytes_per_s"), peaks.get("bf16_flop_per_s")
    md.append(f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton "
              f"{env.get('triton')}, python {env.get('python')}; peaks for the fractions: "
              + (f"{bw / 1e12:.2f} TB/s HBM, {fl / 1e12:.0f} TFLOP/s dense bf16 "
                 f"({peaks.get('source')})" if bw and fl else f"none ({peaks.get('source')})"))
    md += ["", "## Stages", ""]
    md += _table(report["stages"], [("stage", "stage", ""), ("status", "status", ""),
                                    ("seconds", "s", ".0f"), ("cap_s", "cap s", ".0f"),
                                    ("note", "note", "")])
    for r in rows:
        if r.get("log_tail"):
            md += ["", f"{r['stage']} ({r['status']}), end of its log:", "", "```"]
            md += r["log_tail"] + ["```"]
    peers = env.get("peers") or {}
    if peers:
        md += ["", "Peers: " + "; ".join(
            f"{k} {v.get('version') or ''}".strip() if v.get("ok") else f"{k} missing ({v['reason']})"
            for k, v in peers.items())]
    md += ["", "## Tests", ""]
    if tests is None:
        md.append("(not run)")
    elif "error" in tests:
        md.append(tests["error"])
    else:
        md.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} "
                  f"errors, {tests['skipped']} skipped (of {tests['tests']})")
        md += [f"- FAILED {c}" for c in tests["failed_cases"]]
    md += ["", "## Cross-entropy (bench_cross_entropy.py)", ""] + _table(ce, CE_COLS)
    md += ["", "## Compression (bench_compress.py)", ""] + _table(comp, COMPRESS_COLS)
    md += ["", "## Low-rank (bench_lowrank.py)", ""]
    keys = list(dict.fromkeys(k for r in lowrank[:50] for k in r))[:10]
    md += _table(lowrank[:50], [(k, k, ".3g") for k in keys]) if lowrank else ["(no rows)"]
    md += ["", "## LoRDO single-process smoke", ""]
    md.append(json.dumps(smoke) if smoke else "(not run)")
    (out / "gpu_report.md").write_text("\n".join(md) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("env", "lordo-smoke", "render"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "env":
        return cmd_env(args.out)
    if args.command == "lordo-smoke":
        return cmd_lordo_smoke(args.out, args.device)
    return cmd_render(args.out)


if __name__ == "__main__":
    sys.exit(main())
