"""sparse_all_gather_mean on real gloo groups on loopback (spawned processes, short timeouts):
the mean per index over the ranks that sent it (top-k) or over all ranks (dense codecs), the
exact bytes each rank sent, a codec mismatch and a dead peer turning into CollectiveError; one error type and one
default timeout for thresher.comm and thresher.optim."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from thresher.comm import CommStats, QuantCodec, TopKCodec, sparse_all_gather_mean

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_comm_worker.py")
TIMEOUT_S = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario, world, tmp_path):
    port = _free_port()
    outs = [str(tmp_path / f"{scenario}-{r}.json") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(r), str(world), str(port), outs[r]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    return procs, outs


def _collect(procs, outs):
    res = []
    for p, o in zip(procs, outs):
        try:
            _, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung")
        assert os.path.exists(o), f"rank wrote no result (rc {p.returncode}):\n{err[-3000:]}"
        r = json.load(open(o))
        assert "traceback" not in r, r["traceback"]
        res.append(r)
    return res


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """One 3-rank group runs every scenario (process start-up is most of the cost)."""
    procs, outs = _launch("aggregate", 3, tmp_path_factory.mktemp("comm"))
    try:
        yield _collect(procs, outs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_three_rank_mean_and_bytes(group_results):
    for r in group_results:
        for name in ("topk", "quant", "lowrank"):
            got = r[name]
            assert got["equal"], (name, got)
            assert got["out_ok"] and got["shape_ok"], (name, got)
            assert got["bytes"] == got["nbytes"] + 16 and got["messages"] == 1, (name, got)
        assert "ranks encoded different things" in r["mismatch"], r["mismatch"]


def test_dead_peer_raises_instead_of_hanging(group_results):
    assert group_results[2]["exited"]
    for rank in (0, 1):
        assert f"rank {rank} of 3" in group_results[rank]["dead"], group_results[rank]["dead"]


def test_single_process_is_a_plain_decode():
    codec = TopKCodec(k=8, chunk=100)
    x = torch.randn(1000)
    stats = CommStats()
    p = codec.encode(x)
    assert torch.equal(sparse_all_gather_mean(p, stats=stats), codec.decode(p))
    assert stats.bytes_sent == 0  # no collective in a world of one
    with pytest.raises(ValueError, match="timeout"):
        sparse_all_gather_mean(QuantCodec().encode(x), timeout=0)
    with pytest.raises(TypeError, match="packed"):
        sparse_all_gather_mean(x)


def test_comm_stats_state_round_trip():
    s = CommStats()
    s.record(100)
    s.record(16, "header")
    t = CommStats()
    t.load_state_dict(s.state_dict())
    assert t == s and t.bytes_sent == 116 and t.by_kind == {"all_gather": 100, "header": 16}


def test_one_error_type_and_one_default_timeout():
    import inspect

    import thresher.comm as comm
    import thresher.optim as optim
    from thresher.comm import collectives
    from thresher.optim import _dist

    assert comm.CommError is comm.CollectiveError is optim.CollectiveError
    assert _dist.DEFAULT_TIMEOUT_S == comm.DEFAULT_TIMEOUT_S == 300.0
    default = inspect.signature(sparse_all_gather_mean).parameters["timeout"].default
    assert default == comm.DEFAULT_TIMEOUT_S
    assert collectives.resolve_group().timeout_s == comm.DEFAULT_TIMEOUT_S
    assert optim.DDPAdamW([torch.nn.Parameter(torch.zeros(2))]).dist.timeout_s == default
    with pytest.raises(ValueError, match="timeout must be a positive finite"):
        sparse_all_gather_mean(QuantCodec().encode(torch.randn(300)), timeout=float("inf"))
