"""Benchmark of the compression ops and codecs (thresher.ops.compress, thresher.comm).

Three tables:

1. **Encode / decode throughput** (GB/s of dense fp32 input, median with p20/p80 over
   interleaved samples) of the fused top-k + 2-bit quantise + error feedback + pack
   (k=64 per 4096-chunk) against
   * "plain PyTorch": the straightforward composition ``e += x; torch.topk(|e| per chunk);
     gather; quantise; scatter the error update; bit-pack`` (float topk, no tie rule);
   * "reference": thresher's own pure-PyTorch backend (the same composition made exact:
     int64 (|e| bits, index) keys so ties go to the lowest index, bit-identical to the
     kernels);
   * PowerSGD's compression: the core maths of
     ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` (``M += e; P = M Q;
     _orthogonalize(P); Q = M^T P; e = M - P Q^T``) run on a single process -- the hook
     itself needs a GradBucket from DDP, so its arithmetic is called directly, with its own
     ``_orthogonalize`` -- on the same data viewed as a square matrix, rank 4;
   * the PowerSGD hook itself: ``powerSGD_hook`` registered on DDP over a one-process group
     (NCCL on CUDA, gloo on the CPU), timed as DDP backward with the hook minus without;
   plus the blockwise 8-bit quantiser (cpu vs reference) and the decoders.
2. **Relative error vs bytes sent** for each codec setting: one-shot ``||D(E(x)) - x|| /
   ||x||`` and, with error feedback over 10 steps of fresh Gaussian x, the error of the
   accumulated sent sum against the accumulated x.
3. **GPU readiness** (``--gpu-report``): registers / spills of the Triton kernels AOT-compiled
   for sm_90, and the H100 roofline of the top-k encode (12 bytes an element + payload).

    python benchmarks/bench_compress.py            # 64M elements (the target's size)
    python benchmarks/bench_compress.py --quick    # 2M elements, < 60 s
    python benchmarks/bench_compress.py --device cuda --no-error-table   # GPU backends

Writes ``<out>/bench_compress.{csv,json}``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from thresher.comm import LowRankCodec, QuantCodec, TopKCodec  # noqa: E402
from thresher.ops import compress as ops  # noqa: E402

K, CHUNK, BITS = 64, 4096, 2


# ----------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------


def plain_topk_encode(x, e, k=K, chunk=CHUNK, bits=BITS):
    """What a user writes with torch ops (n a multiple of chunk, chunk <= 4096)."""
    e += x
    ev = e.view(-1, chunk)
    a = ev.abs()
    idx = torch.topk(a, k, dim=1, sorted=False).indices
    vals = ev.gather(1, idx)
    L = 1 << bits
    scale = a.amax(1, keepdim=True) / (L - 1)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 0.5 / scale)
    q = torch.floor(vals * inv).clamp_(-(L // 2), L // 2 - 1).to(torch.int64) + L // 2
    ev.scatter_add_(1, idx, -((2 * q + 1 - L).to(torch.float32) * scale))
    per = 8 // bits
    shifts = torch.arange(per, device=x.device) * bits
    codes = (q.view(q.size(0), -1, per) << shifts).sum(-1).to(torch.uint8)
    i2 = idx.view(idx.size(0), -1, 2)
    w = i2[..., 0] | (i2[..., 1] << 12)  # two 12-bit indices -> 3 bytes
    ib = torch.stack([w & 255, (w >> 8) & 255, w >> 16], -1).to(torch.uint8)
    return scale, codes, ib


def plain_topk_decode(parts, out, k=K, chunk=CHUNK, bits=BITS):
    scale, codes, ib = parts
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device) * bits
    q = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(codes.size(0), -1)
    b = ib.to(torch.int64)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    idx = torch.stack([w & 4095, w >> 12], -1).view(w.size(0), -1)
    L = 1 << bits
    out.view(-1, chunk).scatter_add_(1, idx, (2 * q + 1 - L).to(torch.float32) * scale)


def powersgd_state(n, rank, seed=0, device="cpu"):
    side = int(math.isqrt(n))
    while n % side:
        side -= 1
    g = torch.Generator().manual_seed(seed)
    return side, n // side, torch.randn(n // side, rank, generator=g).to(device)


def powersgd_compress(x, e, q):
    """powerSGD_hook's arithmetic for one matrix, on one process (no all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize

    M = e.view(-1, q.size(0))
    M += x.view_as(M)
    p = M @ q
    _orthogonalize(p.unsqueeze(0))  # batched API: (1, rows, rank), in place
    q.copy_(M.t() @ p)
    M -= p @ q.t()  # the error feedback: what was not sent stays in e
    return p, q


class _Weighted(torch.nn.Module):
    """One (side, cols) parameter W; forward(x) = sum(W * x), so W's gradient is x. DDP's
    reducer (and so the comm hook) runs only for a forward taken through the DDP wrapper."""

    def __init__(self, side, cols, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(side, cols, device=device))

    def forward(self, x):
        return (self.weight * x).sum()


def powersgd_hook_times(n, repeats, device, rank=4):
    """The real ``powerSGD_hook`` (beside its maths above): DDP on a one-process group (NCCL on
    CUDA, gloo on the CPU) with one (side, n / side) parameter whose gradient is x, timed over
    ``backward()`` with the hook registered and with DDP's default all-reduce; the difference
    is what the hook's compression (and its error feedback) costs. Returns
    ``{"hook_ms", "plain_ddp_ms", "p20", "p80", "n"}`` of the hook run and the baseline."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    from thresher.comm.collectives import free_port

    device = torch.device(device)
    side, cols, _ = powersgd_state(n, rank)
    x = torch.randn(side, cols, generator=torch.Generator().manual_seed(0)).to(device)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60),
                                **({"device_id": device} if device.type == "cuda" else {}))
    try:
        times = {}
        for hook in (False, True):
            ddp = torch.nn.parallel.DistributedDataParallel(
                _Weighted(side, cols, device), bucket_cap_mb=max(25, 8 * n // 2**20))
            if hook:
                # start_powerSGD_iter=2: the first backward is the all-reduce warm-up the hook
                # requires with error feedback; min_compression_rate 0 compresses any shape
                state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                           start_powerSGD_iter=2, min_compression_rate=0.0)
                ddp.register_comm_hook(state, psgd.powerSGD_hook)

            def step(ddp=ddp):
                ddp(x).backward()
                ddp.module.weight.grad = None

            times[hook] = C.time_callable(step, warmup=3, repeats=repeats, device=device)
            if hook:  # compressed: the rank-4 gradient (with error feedback) is not x
                ddp(x).backward()
                diff = float((ddp.module.weight.grad - x).norm() / x.norm())
                if not diff > 0.1:
                    raise RuntimeError(f"powerSGD_hook did not compress (|grad - x|/|x| = {diff})")
    finally:
        if own:
            dist.destroy_process_group()
    t = times[True]
    return {"hook_ms": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms, "n": t.n,
            "plain_ddp_ms": times[False].median_ms, "bytes": 4 * rank * (side + cols)}


# ----------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------


def is_target(impl: str) -> bool:
    """--target-only: the fused top-k of every native backend on the device, and the plain
    composition it is measured against."""
    return impl.endswith("(fused)") or impl == "topk plain PyTorch"


def fused_backends(device) -> list[str]:
    """The native backends of the compression ops on this device that can run here."""
    dev = torch.device(device)
    return [b for b in ("cuda", "triton", "cpu")
            if not ops.DISPATCH.reasons(b, dev, torch.float32, chunk=CHUNK, block=256)]


def throughput(n, repeats, copy_gbps, only=None, device="cpu", peak_bw=None, memory=False):
    """Encode / decode timings on ``device``: every native backend there ("topk thresher
    <backend> (fused)", "quant8 thresher <backend>"), the reference, plain PyTorch,
    PowerSGD's core maths and (without ``only``, a predicate on the names) powerSGD_hook.
    ``memory``: also each encode's peak extra memory (one call)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).to(device)
    native = fused_backends(device)
    side, cols, q0 = powersgd_state(n, 4, device=device)
    psgd_q = q0.clone()
    zeros = lambda: torch.zeros(n, device=device)  # noqa: E731
    errs = {}

    def err(key):
        return errs.setdefault(key, zeros())

    calls = {f"topk thresher {b} (fused)": (lambda b=b: ops.topk_encode(
        x, err(b), k=K, chunk=CHUNK, bits=BITS, backend=b)) for b in native}
    calls.update({
        "topk plain PyTorch": lambda: plain_topk_encode(x, err("plain")),
        "topk thresher reference": lambda: ops.topk_encode(x, err("reference"), k=K, chunk=CHUNK, bits=BITS, backend="reference"),
        "PowerSGD rank 4 (core maths)": lambda: powersgd_compress(x, err("powersgd"), psgd_q),
    })
    calls.update({f"quant8 thresher {b}": (lambda b=b: ops.quantize_blockwise(
        x, err("q8" + b), bits=8, block=256, backend=b)) for b in native + ["reference"]})
    if only:
        calls = {k: v for k, v in calls.items() if only(k)}
    for fn in calls.values():  # warm-up (first touch of the error buffers, first-call costs)
        fn()
    enc = C.time_interleaved(calls, repeats=repeats, min_sample_s=0.0, device=device)
    peaks = {k: C.measure_peak_memory(fn, device)[1] for k, fn in calls.items()} if memory else {}
    best = native[0] if native else "reference"
    payload = ops.topk_encode(x, k=K, chunk=CHUNK, bits=BITS, backend=best)
    plain_parts = plain_topk_encode(x, zeros())
    q8 = ops.quantize_blockwise(x, bits=8, block=256, backend=best)
    outs: dict = {}

    def out(key):
        return outs.setdefault(key, zeros())

    p_psgd, q_psgd = powersgd_compress(x, zeros(), q0.clone())
    dcalls = {f"topk thresher {b} (fused)": (lambda b=b: ops.topk_decode(
        payload, n, out=out(b), backend=b)) for b in native}
    dcalls.update({
        "topk plain PyTorch": lambda: plain_topk_decode(plain_parts, out("plain")),
        "topk thresher reference": lambda: ops.topk_decode(payload, n, out=out("ref"), backend="reference"),
        "PowerSGD rank 4 (core maths)": lambda: out("psgd").view(side, cols).addmm_(p_psgd, q_psgd.t()),
    })
    dcalls.update({f"quant8 thresher {b}": (lambda b=b: ops.dequantize_blockwise(
        q8, n, out=out("q8" + b), backend=b)) for b in native + ["reference"]})
    dcalls = {k: v for k, v in dcalls.items() if k in calls}
    for fn in dcalls.values():
        fn()
    dec = C.time_interleaved(dcalls, repeats=repeats, min_sample_s=0.0, device=device)
    nbytes = {k: payload.numel() if k.startswith("topk thresher") else q8.numel()
              for k in calls if k.startswith(("topk thresher", "quant8"))}
    nbytes["topk plain PyTorch"] = sum(t.numel() * t.element_size() for t in plain_parts)
    nbytes["PowerSGD rank 4 (core maths)"] = 4 * 4 * (side + cols)
    rows = []
    base_enc = enc["topk plain PyTorch"].median_ms
    base_dec = dec["topk plain PyTorch"].median_ms
    for name in calls:
        te, td = enc[name], dec[name]
        rows.append({
            "section": "throughput", "impl": name, "numel": n, "payload_bytes": nbytes[name],
            "encode_ms": te.median_ms, "encode_p20_ms": te.p20_ms, "encode_p80_ms": te.p80_ms,
            "encode_gbps": n * 4 / (te.median_ms * 1e-3) / 1e9,
            "encode_vs_plain": base_enc / te.median_ms,
            "decode_ms": td.median_ms, "decode_p20_ms": td.p20_ms, "decode_p80_ms": td.p80_ms,
            "decode_gbps": n * 4 / (td.median_ms * 1e-3) / 1e9,
            "decode_vs_plain": base_dec / td.median_ms,
            # the fused encode moves x (4 B) + e (read + write, 8 B) per element
            "encode_copy_fraction": (12 * n / (te.median_ms * 1e-3) / 1e9) / copy_gbps
            if name.endswith("(fused)") else None,
            "encode_frac_peak_bw": 12 * n / (te.median_ms * 1e-3) / peak_bw
            if name.endswith("(fused)") and peak_bw else None,
            "peak_mib": C.mib(peaks.get(name)), "device": str(device),
            "repeats": te.n,
        })
    if only is None:
        h = powersgd_hook_times(n, repeats, device)
        rows.append({
            "section": "throughput", "impl": "PowerSGD hook rank 4 (DDP backward - plain DDP)",
            "numel": n, "payload_bytes": h["bytes"], "device": str(device),
            "encode_ms": h["hook_ms"] - h["plain_ddp_ms"], "hook_backward_ms": h["hook_ms"],
            "encode_p20_ms": h["p20"] - h["plain_ddp_ms"], "encode_p80_ms": h["p80"] - h["plain_ddp_ms"],
            "plain_ddp_backward_ms": h["plain_ddp_ms"],
            "encode_vs_plain": base_enc / max(h["hook_ms"] - h["plain_ddp_ms"], 1e-9),
            "repeats": h["n"],
            "note": "the hook's whole compression + decompression (one process: its all-reduces "
                    "are local), measured as DDP backward with the hook minus without",
        })
    return rows


def error_table(n, steps=10):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g) for _ in range(steps)]
    side = 1 << (int(math.log2(n)) // 2)
    settings = [
        ("TopK k=64 c=4096 2-bit", TopKCodec(64, 4096, 2)),
        ("TopK k=64 c=4096 4-bit", TopKCodec(64, 4096, 4)),
        ("TopK k=64 c=4096 8-bit", TopKCodec(64, 4096, 8)),
        ("TopK k=256 c=4096 2-bit", TopKCodec(256, 4096, 2)),
        ("TopK k=16 c=1024 8-bit", TopKCodec(16, 1024, 8)),
        ("Quant 8-bit absmax b=256", QuantCodec(8, 256)),
        ("Quant 4-bit absmax b=256", QuantCodec(4, 256)),
        ("Quant 2-bit absmax b=256", QuantCodec(2, 256)),
        ("Quant 8-bit meanstd b=256", QuantCodec(8, 256, "meanstd")),
        ("Quant 4-bit meanstd b=256", QuantCodec(4, 256, "meanstd")),
        ("Quant 2-bit meanstd b=256", QuantCodec(2, 256, "meanstd")),
        ("LowRank rank 4 (power)", LowRankCodec(4)),
        ("LowRank rank 32 (power)", LowRankCodec(32)),
    ]
    rows = []
    for name, codec in settings:
        shape = (side, n // side) if isinstance(codec, LowRankCodec) else (n,)
        x0 = xs[0].view(shape)
        one = codec.decode(codec.encode(x0))
        rel = float((one - x0).norm() / x0.norm())
        e = torch.zeros(shape)
        sent = torch.zeros(shape)
        for x in xs:
            sent += codec.decode(codec.encode(x.view(shape), error=e))
        total = sum(xs).view(shape)
        rows.append({"section": "error", "codec": name, "numel": n, "bytes": codec.nbytes(shape),
                     "ratio": 4 * n / codec.nbytes(shape), "bits_per_elem": 8 * codec.nbytes(shape) / n,
                     "rel_err_one_shot": rel,
                     f"rel_err_ef_{steps}_steps": float((sent - total).norm() / total.norm())})
    # PowerSGD (same maths as the benchmark baseline), rank 4, with its error feedback
    s, cols, q = powersgd_state(n, 4)
    e = torch.zeros(n)
    p, qq = powersgd_compress(xs[0], torch.zeros(n), q.clone())
    rel = float(((p @ qq.t()).reshape(-1) - xs[0]).norm() / xs[0].norm())
    sent = torch.zeros(n)
    q = q.clone()
    for x in xs:
        p, qq = powersgd_compress(x, e, q)
        sent += (p @ qq.t()).reshape(-1)
    total = sum(xs)
    nb = 4 * 4 * (s + cols)
    rows.append({"section": "error", "codec": "PowerSGD rank 4", "numel": n, "bytes": nb,
                 "ratio": 4 * n / nb, "bits_per_elem": 8 * nb / n, "rel_err_one_shot": rel,
                 f"rel_err_ef_{steps}_steps": float((sent - total).norm() / total.norm())})
    return rows


def gpu_report(n):
    from thresher.kernels import compress as K_
    stats = K_.aot_compile_stats(90, full=True)
    payload = ops.topk_nbytes(n)
    moved = 12 * n + payload
    return stats, {"topk_encode_bytes": moved, "h100_roofline_ms": C.roofline_seconds(bytes_moved=moved) * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap, default_repeats=5)
    ap.add_argument("--quick", action="store_true", help="2M elements, 3 repeats (< 60 s)")
    ap.add_argument("--numel", type=int, default=None, help="elements (default 64M, quick 2M)")
    ap.add_argument("--gpu-report", action="store_true", help="AOT-compile the Triton kernels for sm_90")
    ap.add_argument("--target-only", action="store_true",
                    help="only the headline pair (fused top-k vs plain PyTorch), no error table")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--no-error-table", action="store_true", help="skip table 2")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.numel or (2 * 2**20 if args.quick else 64 * 2**20)
    if n % CHUNK:
        ap.error(f"--numel must be a multiple of {CHUNK}")
    repeats = 3 if args.quick else args.repeats
    t0 = time.time()
    copy = C.measure_copy_bandwidth(min(256 * C.MiB, 4 * n), repeats=3, device=device)
    peaks = C.device_peaks(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rows = throughput(n, repeats, copy["copy_gbps"], is_target if args.target_only else None,
                      device=device, peak_bw=peaks["hbm_bytes_per_s"],
                      memory=not args.no_memory)
    erows = [] if args.target_only or args.no_error_table else \
        error_table(min(n, 2**22) if not args.quick else 2**19)
    meta = C.collect_metadata(device=device if device.type == "cuda" else None, numel=n, k=K,
                              chunk=CHUNK, bits=BITS, **copy, **peaks,
                              threads=torch.get_num_threads())
    sections = {}
    print(f"\n## Encode / decode throughput: {n / 2**20:.0f}M fp32 elements, top-k {K} per "
          f"{CHUNK}-chunk, {BITS}-bit, error feedback ({torch.get_num_threads()} threads; copy "
          f"bandwidth {copy['copy_gbps']:.1f} GB/s)\n")
    print(C.markdown_table(rows, [
        ("impl", "implementation"), ("payload_bytes", "bytes sent", ","),
        ("encode_ms", "encode ms", ".1f"), ("encode_p20_ms", "p20", ".1f"), ("encode_p80_ms", "p80", ".1f"),
        ("encode_gbps", "encode GB/s", ".2f"), ("encode_vs_plain", "vs plain", ".2f"),
        ("decode_ms", "decode ms", ".1f"), ("decode_gbps", "decode GB/s", ".2f"),
        ("decode_vs_plain", "vs plain", ".2f")]))
    for fused in (r for r in rows if r["impl"].endswith("(fused)")):
        print(f"\n{fused['impl']} encode: {fused['encode_vs_plain']:.2f}x the plain-PyTorch "
              f"composition (target >= 3x: {'met' if fused['encode_vs_plain'] >= 3 else 'NOT met'});"
              f" {fused['encode_copy_fraction']:.0%} of copy bandwidth at 12 B/element"
              + (f", {fused['encode_frac_peak_bw']:.0%} of the {peaks['source']} HBM peak"
                 if fused.get("encode_frac_peak_bw") else ""))
    steps_key = [k for k in erows[0] if k.startswith("rel_err_ef_")][0] if erows else ""
    if erows:
        print(f"\n## Relative error vs bytes sent ({erows[0]['numel'] / 2**20:.0f}M Gaussian elements)\n")
    print("" if not erows else C.markdown_table(erows, [
        ("codec", "codec"), ("bytes", "bytes", ","), ("ratio", "x smaller", ".1f"),
        ("bits_per_elem", "bits/elem", ".3f"), ("rel_err_one_shot", "rel err (one shot)", ".4f"),
        (steps_key, "rel err, EF, sum of 10 steps", ".4f")]))
    if args.gpu_report:
        stats, roof = gpu_report(n)
        sections["gpu"] = {"aot_sm90": stats, **roof}
        print("\n## Triton kernels, AOT sm_90\n")
        print(C.markdown_table(stats, [("kernel", "kernel"), ("dtype", "dtype"), ("block", "block"),
                                       ("num_warps", "warps"), ("n_regs", "regs"), ("n_spills", "spills")]))
        print(f"\nH100 roofline of the fused top-k encode at {n / 2**20:.0f}M: "
              f"{roof['h100_roofline_ms']:.3f} ms ({roof['topk_encode_bytes'] / 1e6:.0f} MB)")
    paths = C.write_results(args.out, "bench_compress", rows + erows, meta, **sections)
    print(f"\nwrote {paths['csv']} and {paths['json']} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
