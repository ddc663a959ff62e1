#!/usr/bin/env python
"""One training step (forward + backward + SGD step) of a HF Llama with a wide vocabulary:
unpatched (HF's own loss on the full logits) vs ``apply_thresher`` vs cut-cross-entropy.

The model: ``LlamaForCausalLM`` with V = 128,256 (Llama 3's vocabulary), a small hidden size so
it fits a CPU (default 128, 2 layers, untied head), fp32, batch 4 x 256 tokens.

* ``peak``: the step's peak resident memory above the memory before it (parameter gradients
  freed, so their allocation counts), sampled every 0.2 ms from ``/proc/self/statm`` by a
  thread, each variant in its own process, after one warm-up step (which also compiles CCE's
  kernel). The tensors that matter here are hundreds of MB, so
  they are mmap'ed and returned to the system when freed: RSS follows live memory.
* ``time``: the median over ``--steps`` steps, the variants' processes run in ``--rounds``
  interleaved rounds; ratios are against the unpatched step of the same run.
* ``cce``: ``cut_cross_entropy.linear_cross_entropy(impl="torch_compile", shift=True)`` (its
  CPU implementation) on the decoder's hidden states and the LM head's weight -- what CCE's
  ``cce_patch`` puts in a Llama's forward; the PyPI release (25.1.1) does not ship
  ``cce_patch`` itself.

    python benchmarks/bench_hf.py                    # the defaults above (~3 min on 2 cores)
    python benchmarks/bench_hf.py --quick            # V = 32,000, batch 2 x 128 (< 1 min)

Prints a Markdown table and writes JSON to ``--out`` (default bench-results/bench_hf.json).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

VARIANTS = ("unpatched", "thresher", "cce")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread while active; ``peak`` is above the start."""

    def __enter__(self):
        self.start, self.peak, self._run = _rss(), 0, True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, _rss() - self.start)
            time.sleep(2e-4)

    def __exit__(self, *exc):
        self._run = False
        self._t.join()
        self.peak = max(self.peak, _rss() - self.start)


def _model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False, max_position_embeddings=a.seq)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).train()


def _step_fn(variant, model):
    if variant == "unpatched":
        return lambda ids: model(input_ids=ids, labels=ids).loss
    if variant == "thresher":
        from thresher.integrations import apply_thresher

        apply_thresher(model)
        return lambda ids: model(input_ids=ids, labels=ids).loss
    from cut_cross_entropy import linear_cross_entropy

    def cce(ids):
        hidden = model.model(input_ids=ids).last_hidden_state
        return linear_cross_entropy(hidden, model.lm_head.weight, ids, shift=True,
                                    impl="torch_compile")
    return cce


def child(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    model = _model(a)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_of = _step_fn(a.child, model)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))

    def step():
        loss = loss_of(ids)
        loss.backward()
        opt.step()
        return float(loss)

    first = step()  # warm-up (CCE compiles here)
    # the gradients are freed before the measured step, so its peak includes allocating them
    opt.zero_grad(set_to_none=True)
    gc.collect()
    with PeakRSS() as mem:
        step()
    times = []
    for _ in range(a.steps):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": a.child, "peak_bytes": mem.peak, "times": times, "first_loss": first}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.vocab, a.batch, a.seq = 32000, 2, 128
    if a.child:
        print(json.dumps(child(a)))
        return
    args = [f"--{k}={getattr(a, k)}" for k in ("vocab", "hidden", "layers", "batch", "seq",
                                                "steps", "threads")]
    runs = {v: [] for v in a.variants}
    for _ in range(a.rounds):
        for v in a.variants:
            out = subprocess.run([sys.executable, __file__, *args, f"--child={v}"],
                                 capture_output=True, text=True, check=True).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    res = {v: {"peak_MiB": statistics.median(r["peak_bytes"] for r in rs) / 2**20,
               "time_s": statistics.median(t for r in rs for t in r["times"]),
               "loss": rs[0]["first_loss"]} for v, rs in runs.items()}
    base = res.get("unpatched")
    print(f"HF Llama, V={a.vocab}, hidden {a.hidden}, {a.layers} layers, batch {a.batch} x "
          f"{a.seq}, fp32, {a.threads} thread(s), {a.rounds} rounds x {a.steps} steps\n")
    print("| variant | step peak (MiB) | vs unpatched | step time (s) | vs unpatched | loss |")
    print("|---|---|---|---|---|---|")
    for v, r in res.items():
        mem = f"{r['peak_MiB'] / base['peak_MiB']:.2f}x" if base else "-"
        tim = f"{r['time_s'] / base['time_s']:.2f}x" if base else "-"
        print(f"| {v} | {r['peak_MiB']:.0f} | {mem} | {r['time_s']:.3f} | {tim} | "
              f"{r['loss']:.4f} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_hf.json"), "w") as f:
        json.dump({"args": vars(a), "results": res, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
