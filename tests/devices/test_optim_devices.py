"""LowRankAdam (the optimizer around the fused low-rank step) on every device x backend x
claimed dtype: three steps on a small model's parameters (low-rank matrices, a matrix
below the rank that takes AdamW steps, a bias) against the same optimizer in float64 on the
CPU, with the step tolerance of tests/ops (2x the reference backend's error in the same
dtype on the same device, plus 2^-20). LoRDO's multi-process runs are tests/optim's; the
GPU check (benchmarks/gpu_check.sh) runs a single-process NCCL LoRDO smoke test."""
from __future__ import annotations

import os
import sys

import torch

from thresher.optim import LowRankAdam
from thresher.ops.lowrank import DISPATCH  # noqa: F401 - read by tests/conftest.py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _truth import assert_close_to_truth  # noqa: E402

SHAPES = [(48, 20), (20, 48), (3, 5), (20,)]


def run(device, dtype, backend, steps=3):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)
              .requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * 0.1 for s in SHAPES]
             for _ in range(steps)]
    opt = LowRankAdam(params, lr=0.02, rank=4, update_proj_gap=2, weight_decay=0.1,
                      proj="svd", backend=backend)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.to(device, dtype)
        opt.step()
    return [p.detach() for p in params]


def test_lowrank_adam_steps(backend_case):
    dev, be, dt = backend_case
    truth = run("cpu", torch.float64, "reference")
    eager = run(dev, dt, "reference")
    got = run(dev, dt, be)
    for shape, a, t, e in zip(SHAPES, got, truth, eager):
        assert a.dtype == dt and a.device == dev
        assert_close_to_truth(f"{be} param {shape}", a, t, e, dt, floor=2.0 ** -20)
