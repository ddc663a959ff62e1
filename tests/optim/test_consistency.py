"""The ranks of every distributed optimizer agree at construction (thresher.optim._dist):
on a real 2-rank gloo group, a rank with a different parameter shape, dtype or count, or a
different setting (compression, sync_every, lr, ...), makes *every* rank raise the same
ValueError naming what differs and each rank's value -- not a SIGABRT inside gloo, not a
timeout, not a silent mismatch; ranks that start from different weights leave the
constructor with rank 0's."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _optim_workers as W  # noqa: E402

METHODS = ["lordo", "ddp", "lowrank_ddp", "diloco", "sparseloco"]
# settings every method accepts on TinyNet; the timeout is short so that a hang would show
# up as a CollectiveError, not as an agreement error
BASE = dict(lordo=dict(lr=0.05, rank=2, sync_every=3), ddp=dict(lr=0.05),
            lowrank_ddp=dict(lr=0.05, rank=2), diloco=dict(lr=0.05, sync_every=3),
            sparseloco=dict(lr=0.05, sync_every=3, k=4, chunk=16))
TIMEOUT = 20.0


def construct(method, kw1=None, net1=None, kw0=None, steps=0):
    """Rank 0 builds BASE[method] (+ kw0) on the plain TinyNet; rank 1 the same + kw1 on
    TinyNet changed by net1."""
    kw0 = dict(BASE[method], timeout=TIMEOUT, **(kw0 or {}))
    kw1 = dict(kw0, **(kw1 or {}))
    return W.pool().run(W.w_construct, method, [kw0, kw1], [{}, net1 or {}], steps)


def assert_mismatch(out, *needles):
    kinds = [o[0] for o in out]
    assert kinds == ["ValueError", "ValueError"], out
    assert out[0][1] == out[1][1]  # every rank names the same differences
    msg = out[0][1]
    assert "ranks built different" in msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("method", METHODS)
def test_shape_mismatch(method):
    out = construct(method, net1=dict(w1=(6, 4)))
    assert_mismatch(out, "parameter 0 (param_groups[0]['params'][0]): shape (6, 5) float64 "
                         "on rank 0; shape (6, 4) float64 on rank 1")


@pytest.mark.parametrize("method", ["lordo", "ddp", "sparseloco"])
def test_dtype_mismatch(method):
    out = construct(method, net1=dict(dtype=torch.float32))
    assert_mismatch(out, "shape (3,) float64 on rank 0; shape (3,) float32 on rank 1")


def test_parameter_count_mismatch():
    out = construct("diloco", net1=dict(extra=True))
    assert_mismatch(out, "number of parameters in param_groups[0]: 3 on rank 0; 4 on rank 1",
                    "parameter 3 (param_groups[0]['params'][3]): (absent) on rank 0; "
                    "shape (2,) float64 on rank 1")


def test_compression_mismatch():
    out = construct("lordo", kw1=dict(compression="topk",
                                      compression_options=dict(k=4, chunk=16)))
    assert_mismatch(out, "compression: None on rank 0; TopKCodec(k=4, chunk=16, bits=2) on rank 1")
    out = construct("sparseloco", kw1=dict(k=8))
    assert_mismatch(out, "codec: TopKCodec(k=4, chunk=16, bits=2) on rank 0; "
                         "TopKCodec(k=8, chunk=16, bits=2) on rank 1")


@pytest.mark.parametrize("method", ["lordo", "diloco", "sparseloco"])
def test_sync_every_mismatch(method):
    assert_mismatch(construct(method, kw1=dict(sync_every=4)),
                    "sync_every: 3 on rank 0; 4 on rank 1")


@pytest.mark.parametrize("method, kw1, needle", [
    ("ddp", dict(lr=0.1), "param_groups[0]['lr']: 0.05 on rank 0; 0.1 on rank 1"),
    ("lowrank_ddp", dict(rank=3), "param_groups[0]['rank']: 2 on rank 0; 3 on rank 1"),
    ("lordo", dict(omega=0.25), "param_groups[0]['omega']: 0.5 on rank 0; 0.25 on rank 1"),
    ("lordo", dict(seed=1), "seed: 0 on rank 0; 1 on rank 1"),
    ("diloco", dict(outer_lr=0.5), "outer_lr: 0.7 on rank 0; 0.5 on rank 1"),
    ("sparseloco", dict(beta=0.9), "beta: 0.95 on rank 0; 0.9 on rank 1"),
])
def test_setting_mismatch(method, kw1, needle):
    assert_mismatch(construct(method, kw1=kw1), needle)


def test_every_difference_is_named():
    out = construct("lordo", kw1=dict(sync_every=4, omega=0.25), net1=dict(w1=(6, 4)))
    assert_mismatch(out, "sync_every: 3 on rank 0; 4 on rank 1", "param_groups[0]['omega']",
                    "parameter 0 (param_groups[0]['params'][0])")


def test_equal_values_written_differently_agree():
    # 1 and 1.0 are the same learning rate; a list and a tuple the same betas
    out = construct("ddp", kw0=dict(lr=1, betas=(0.9, 0.99)),
                    kw1=dict(lr=1.0, betas=[0.9, 0.99]))
    assert [o[0] for o in out] == ["ok", "ok"], out


@pytest.mark.parametrize("method", METHODS)
def test_different_seeds_leave_construction_identical(method):
    out = construct(method, net1=dict(seed=1))
    assert [o[0] for o in out] == ["ok", "ok"], out
    rank0 = W.flat(W.TinyNet(torch.float64, seed=0))
    assert not torch.equal(rank0, W.flat(W.TinyNet(torch.float64, seed=1)))
    for _, start, _ in out:
        assert torch.equal(start, rank0)  # rank 0's initial weights, on every rank


def test_different_seeds_then_ddp_stays_identical():
    out = construct("ddp", net1=dict(seed=1), steps=3)
    assert torch.equal(out[0][2], out[1][2])


def test_missing_peer_at_construction_raises_collective_error():
    out = W.run_ranks(W.w_construct_without_peer, 2, "diloco", dict(BASE["diloco"], timeout=5.0),
                      timeout=10.0, allow_missing=(1,))
    kind, msg, _ = out[0]
    assert kind == "CollectiveError", msg
    assert "DiLoCo agreement check" in msg and "rank 0 of 2" in msg


def test_agreement_is_one_small_all_gather():
    numel = 6 * 5 + 3 * 6 + 3
    kw = dict(BASE["lordo"], timeout=TIMEOUT)
    out = W.pool().run(W.w_count_construction_collectives, "lordo", [kw, kw])
    for kind, calls in out:  # the 16-byte hash, then rank 0's float64 weights
        assert kind == "ok" and calls == [("all_gather", 16), ("broadcast", 8 * numel)]
    out = W.pool().run(W.w_count_construction_collectives, "lordo",
                       [kw, dict(kw, sync_every=4)])
    for kind, calls in out:  # on a mismatch: the descriptions, and no broadcast
        assert kind == "ValueError"
        assert [c[0] for c in calls] == ["all_gather", "all_gather"] and calls[1][1] > 16
