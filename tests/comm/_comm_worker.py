"""One rank of the tests in test_collectives.py (run as a script: scenario rank world port out)."""
from __future__ import annotations

import datetime
import json
import sys
import traceback


def _inputs(rank, n=10000):
    import torch
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))


def _expected(codec, world, n):
    """The mean every rank should get, recomputed here from every rank's deterministic input."""
    import torch
    acc = torch.zeros(n)
    count = torch.zeros(n, dtype=torch.int32)
    for r in range(world):
        p = codec.encode(_inputs(r, n))
        codec._decode_add(p, acc, count if codec.sparse else None)
    if codec.sparse:
        return torch.where(count > 0, acc / count.clamp_min(1), torch.zeros_like(acc))
    return acc / world


def main(scenario, rank, world, port, out):
    import torch
    import torch.distributed as dist

    from thresher.comm import CollectiveError, CommStats, LowRankCodec, QuantCodec, TopKCodec, sparse_all_gather_mean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    res = {}
    try:
        if scenario == "aggregate":
            for name, codec in [("topk", TopKCodec(k=16, chunk=1000, bits=8)),
                                ("quant", QuantCodec(bits=4, block=128, scaling="meanstd")),
                                ("lowrank", LowRankCodec(rank=2, method="svd"))]:
                n = 10000
                shape = (100, 100) if name == "lowrank" else (n,)
                x = _inputs(rank, n).view(shape)
                e = torch.zeros(shape)
                stats = CommStats()
                packed = codec.encode(x, error=e)
                mean = sparse_all_gather_mean(packed, stats=stats, timeout=30)
                if name == "lowrank":
                    want = torch.zeros(n)
                    for r in range(world):
                        want += codec.decode(codec.encode(_inputs(r, n).view(shape))).reshape(-1)
                    want /= world
                    ok = bool(torch.allclose(mean.reshape(-1), want, atol=1e-5))
                else:
                    ok = bool(torch.equal(mean.reshape(-1), _expected(codec, world, n)))
                out_acc = torch.ones(shape)
                sparse_all_gather_mean(packed, out=out_acc, timeout=30)
                res[name] = {"equal": ok, "bytes": stats.bytes_sent, "nbytes": packed.nbytes,
                             "messages": stats.messages,
                             "out_ok": bool(torch.allclose(out_acc, 1 + mean, atol=1e-6)),
                             "shape_ok": tuple(mean.shape) == shape}
            # peers that disagree on the codec: every rank raises
            codec = TopKCodec(k=16 if rank else 8, chunk=1000)
            try:
                sparse_all_gather_mean(codec.encode(_inputs(rank)), timeout=30)
                res["mismatch"] = "no error"
            except CollectiveError as exc:
                res["mismatch"] = str(exc)
            # the last rank dies without reaching the next collective: the others must raise
            if rank == world - 1:
                res["exited"] = True
                json.dump(res, open(out, "w"))
                import os
                os._exit(0)
            try:
                sparse_all_gather_mean(TopKCodec().encode(_inputs(rank)), timeout=5)
                res["dead"] = "no error"
            except CollectiveError as exc:
                res["dead"] = str(exc)
    except Exception:  # noqa: BLE001
        res["traceback"] = traceback.format_exc()
    json.dump(res, open(out, "w"))


if __name__ == "__main__":
    scen, rank, world, port, out = sys.argv[1:]
    main(scen, int(rank), int(world), int(port), out)
