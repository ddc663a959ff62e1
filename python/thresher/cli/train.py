"""``thresher train``: train the small GPT with any thresher optimizer on N ranks.

    thresher train --optimizer lordo --nproc 4 --model tiny --steps 300 --out runs/lordo
    torchrun --nproc-per-node 4 -m thresher.cli.train --optimizer diloco ...

``--nproc N`` spawns N local gloo ranks (torch.multiprocessing) on loopback; under torchrun
(RANK/WORLD_SIZE in the environment) the module joins the env:// group instead (NCCL when
CUDA is available, else gloo). The model is never wrapped in DDP: each optimizer does its own
communication (see thresher.optim).

Data: ``--corpus`` is "embedded" (the built-in corpus: its pool trains, its target
validates), or any path thresher.data reads (jsonl, parquet, text); ``--val-corpus`` gives
the validation documents (default: every ``--val-every-nth`` document of the corpus is held
out). The tokenised samples are cached in ``--data-cache`` (default OUT/data) under a key of
the data settings and the *content* of the corpus files (a changed corpus is tokenised
again), prepared once, before the ranks start (torchrun: by rank 0 behind a barrier).

Batches: step t of epoch e takes the samples ``perm_e[t*W*B + r*B : ...]`` on rank r (a
permutation shared by all ranks from the seed), so a run is deterministic and resuming
needs only the step number; the RNG states are checkpointed too (dropout, selectors).

Output in ``--out``: ``log.csv`` (step, tokens, train/val loss, bytes, wall time, tokens/s,
lr), ``loss_vs_bytes.png``, ``summary.json``, and ``ckpt/rank{r}.pt`` (atomic, every
``--ckpt-every`` steps and at the end; ``--resume`` continues from it bit-identically on CPU).
Validation loss is each rank's own model on a shard of the validation samples, averaged over
the ranks (a metrics all-reduce, not counted in the optimizer's bytes); for local-update
methods it is the synced model whenever the step is a multiple of ``--sync-every``.

``OUT/run.json`` records the settings once the run has validated them and built its model,
optimizer and selector (:mod:`thresher.data.runs`): a folder holding a run is only continued
with ``--resume`` and with the same settings; only ``--steps`` (extend a run) and settings
that do not change the training (progress, plots, timeouts, threads, checkpoint period, data
cache folder) may differ.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import sys
import time

OPTIMIZERS = ("lordo", "lowrank-ddp", "ddp", "diloco", "sparseloco", "adamw", "lowrank-adam")
CSV_FIELDS = ("step", "tokens", "train_loss", "val_loss", "comm_bytes", "wall_s", "tokens_per_s",
              "lr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from thresher.data.embedded import embedded_size_arg

    g = p.add_argument_group("data")
    g.add_argument("--corpus", default="embedded",
                   help="'embedded' or a path (jsonl, parquet, .txt, folder, HF dataset dir)")
    g.add_argument("--val-corpus", default=None, help="validation documents (default: held out)")
    g.add_argument("--text-field", default="text")
    g.add_argument("--val-every-nth", type=int, default=20,
                   help="without --val-corpus, every n-th document validates")
    g.add_argument("--embedded-size", default="quick", type=embedded_size_arg, help="'quick' or 'default'")
    g.add_argument("--tokenizer", default="bpe", help="'bpe' (trained, cached), 'byte' or a path")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--data-cache", default=None, help="folder for the tokenised samples")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--model", default="tiny", help="GPT preset: tiny, small, base")
    g.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    g.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    g.add_argument("--n-heads", type=int, default=None, help="override the preset's heads")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=8, help="samples per rank and step")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="lordo",
                   help="adamw / lowrank-adam are ddp / lowrank-ddp (one rank: no communication)")
    g.add_argument("--rank", type=int, default=32, help="low-rank r (lordo, lowrank-*)")
    g.add_argument("--lowrank-embeddings", action="store_true",
                   help="also project the embedding matrix (default: plain Adam, as GaLore)")
    g.add_argument("--sync-every", type=int, default=16, help="local steps per sync")
    g.add_argument("--omega", type=float, default=0.5)
    g.add_argument("--mu", type=float, default=1.0)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--outer", choices=("average", "nesterov"), default="nesterov",
                   help="lordo's outer step (default nesterov: better than plain averaging in "
                        "benchmarks/exp_optimizers.py)")
    g.add_argument("--outer-lr", type=float, default=None,
                   help="outer SGD lr (default: 0.7 DiLoCo / lordo nesterov, 1.0 SparseLoCo)")
    g.add_argument("--outer-momentum", type=float, default=None,
                   help="outer momentum (default: 0.9 DiLoCo / lordo nesterov, 0 SparseLoCo)")
    g.add_argument("--compression", default=None, help="lordo: codec for the sync (topk, quant8, ...)")
    g.add_argument("--proj", choices=("svd", "power", "random"), default="svd")
    g.add_argument("--init-proj", choices=("random", "grad"), default="random")
    g.add_argument("--update-proj-gap", type=int, default=50, help="lowrank-ddp refresh period")
    g.add_argument("--scale", type=float, default=1.0, help="lowrank-ddp GaLore scale")
    g.add_argument("--topk", type=int, default=64, help="sparseloco/topk: values per chunk")
    g.add_argument("--chunk", type=int, default=4096)
    g.add_argument("--bits", type=int, default=2)
    g.add_argument("--ef-beta", type=float, default=0.95, help="sparseloco error decay")
    g = p.add_argument_group("selection")
    g.add_argument("--select", default=None,
                   help="online data selection (thresher.selection.online): blade, rho, ...")
    g.add_argument("--select-opt", action="append", default=[], metavar="KEY=VALUE")
    g = p.add_argument_group("run")
    g.add_argument("--nproc", type=int, default=1, help="local gloo ranks to spawn")
    g.add_argument("--timeout", type=float, default=300.0, help="collective timeout (s)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-samples", type=int, default=64, help="validation samples (all ranks)")
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--out", default="runs/train")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plot", action="store_true")


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def _content(path):
    """A corpus or tokenizer argument with the fingerprint of what it names (None, 'embedded',
    'bpe' and 'byte' name no file)."""
    from thresher.data.runs import fingerprint

    if path is None or path in ("embedded", "bpe", "byte") or not os.path.exists(path):
        return path
    return [os.path.abspath(path), fingerprint(path)]


def _data_key(args) -> str:
    desc = json.dumps([_content(args.corpus), _content(args.val_corpus), args.text_field,
                       args.val_every_nth, args.embedded_size, _content(args.tokenizer),
                       args.vocab_size, args.seq_len])
    return hashlib.sha1(desc.encode()).hexdigest()[:12]


def data_dir(args) -> str:
    return os.path.join(args.data_cache or os.path.join(args.out, "data"), _data_key(args))


def prepare_data(args) -> str:
    """Tokenises and packs the corpus once; returns the folder holding train/ and val/."""
    from thresher.data import Document, embedded_corpus, load_tokenizer, pack, read_documents
    from thresher.core.files import atomic_open

    folder = data_dir(args)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    if args.corpus == "embedded":
        corpus = embedded_corpus(seed=0, size=args.embedded_size)
        train_docs, val_docs = corpus.pool, corpus.target
    else:
        docs = list(read_documents(args.corpus, args.text_field))
        if args.val_corpus:
            train_docs = docs
            val_docs = list(read_documents(args.val_corpus, args.text_field))
        else:
            n = args.val_every_nth
            train_docs = [d for i, d in enumerate(docs) if i % n]
            val_docs = [d for i, d in enumerate(docs) if not i % n]
    if not train_docs or not val_docs:
        raise ValueError(f"corpus {args.corpus!r} gave {len(train_docs)} training and "
                         f"{len(val_docs)} validation documents; need at least one of each")
    tok = load_tokenizer(args.tokenizer, train_docs=train_docs, vocab_size=args.vocab_size)

    def renum(ds):  # pack wants increasing ids
        return [Document(i, d.text, d.meta) for i, d in enumerate(ds)]

    train = pack(renum(train_docs), tok, args.seq_len)
    val = pack(renum(val_docs), tok, args.seq_len)
    train.save(os.path.join(folder, "train"))
    val.save(os.path.join(folder, "val"))
    with atomic_open(os.path.join(folder, "meta.json")) as f:
        json.dump({"vocab_size": tok.vocab_size, "train_samples": len(train),
                   "val_samples": len(val), "train_tokens": int(train.num_tokens)}, f)
    return folder


# ----------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------


def build_optimizer(args, model):
    """The optimizer named by --optimizer for this rank's model."""
    from thresher.optim import DDPAdamW, DiLoCo, LoRDO, LowRankDDP, SparseLoCo

    name, lr, wd, timeout = args.optimizer, args.lr, args.weight_decay, args.timeout
    if name in ("ddp", "adamw"):
        return DDPAdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95),
                        timeout=timeout)
    if name == "diloco":
        return DiLoCo(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95),
                      sync_every=args.sync_every, timeout=timeout,
                      outer_lr=0.7 if args.outer_lr is None else args.outer_lr,
                      outer_momentum=0.9 if args.outer_momentum is None else args.outer_momentum)
    if name == "sparseloco":
        return SparseLoCo(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95),
                          sync_every=args.sync_every, beta=args.ef_beta, k=args.topk,
                          chunk=args.chunk, bits=args.bits, timeout=timeout,
                          outer_lr=1.0 if args.outer_lr is None else args.outer_lr,
                          outer_momentum=0.0 if args.outer_momentum is None else args.outer_momentum)
    emb = {id(model.embed.weight)} if not args.lowrank_embeddings else set()
    mats = [p for p in model.parameters() if p.dim() == 2 and id(p) not in emb]
    rest = [p for p in model.parameters() if not (p.dim() == 2 and id(p) not in emb)]
    if name in ("lowrank-ddp", "lowrank-adam"):
        groups = [{"params": mats, "rank": args.rank, "update_proj_gap": args.update_proj_gap,
                   "scale": args.scale}, {"params": rest, "rank": None}]
        return LowRankDDP(groups, lr=lr, weight_decay=wd, betas=(0.9, 0.95), proj=args.proj,
                          timeout=timeout)
    nesterov = args.outer == "nesterov"
    groups = [{"params": mats, "rank": args.rank}, {"params": rest, "rank": None}]
    return LoRDO(groups, lr=lr, sync_every=args.sync_every, omega=args.omega, mu=args.mu,
                 clip=args.clip, betas=(0.9, 0.95), weight_decay=wd, outer=args.outer,
                 outer_lr=(0.7 if nesterov else 1.0) if args.outer_lr is None else args.outer_lr,
                 outer_momentum=(0.9 if nesterov else 0.0) if args.outer_momentum is None
                 else args.outer_momentum,
                 compression=args.compression, proj=args.proj, init_proj=args.init_proj,
                 seed=args.seed, timeout=timeout)


def lr_at(args, step: int) -> float:
    """Linear warm-up then cosine to min_lr_ratio * lr (or constant). step counts from 1."""
    if args.warmup and step <= args.warmup:
        return args.lr * step / args.warmup
    if args.schedule == "constant":
        return args.lr
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    lo = args.lr * args.min_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * min(1.0, frac)))


# ----------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------


# settings that may change when a run is resumed: they do not change the training
RESUMABLE_CHANGES = ("command", "resume", "steps", "no_progress", "no_plot", "timeout", "threads",
                     "ckpt_every", "data_cache")


def run_settings(args) -> dict:
    """The settings recorded in OUT/run.json and compared on --resume."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_CHANGES}


def _parse_opts(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--select-opt must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        out[k] = v
    return out


def _build_selector(args, model, val):
    if not args.select:
        return None
    try:
        from thresher.selection.online import build_online_selector
    except ImportError as exc:
        raise ImportError(f"--select {args.select} needs thresher.selection.online."
                          f"build_online_selector, which is not available: {exc}") from exc
    return build_online_selector(args.select, model, val, **_parse_opts(args.select_opt))


def _batch_indices(n: int, step: int, rank: int, world: int, B: int, seed: int):
    """Samples of rank ``rank`` at step ``step`` (from 1): epochs of a shared permutation."""
    import torch

    per_step = world * B
    steps_per_epoch = max(1, n // per_step)
    epoch, i = divmod(step - 1, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < per_step:  # tiny corpus: wrap around
        perm = perm.repeat(-(-per_step // n))
    start = i * per_step + rank * B
    return perm[start:start + B]


def train_rank(args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from thresher.data import Samples
    from thresher.models.gpt import GPT, GPTConfig

    from thresher.core.checks import IGNORE_INDEX

    from thresher.comm.collectives import all_reduce_mean_, resolve_group
    from thresher.core.files import atomic_save
    from thresher.core.rng import rng_state, set_rng_state

    # ranks share the machine's cores: N ranks x default threads oversubscribes it (and
    # gloo's waits spin), so each rank gets cores // N threads unless told otherwise
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    info = resolve_group(None, args.timeout)
    folder = data_dir(args)
    train = Samples.load(os.path.join(folder, "train"))
    val = Samples.load(os.path.join(folder, "val"))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    n_val = min(len(val), args.eval_samples)
    val_idx = torch.arange(n_val)[rank::world]

    # torchrun on GPUs (NCCL): one device per rank; everything else on the CPU
    if dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(args.seed)  # same initial model on every rank
    over = {k: getattr(args, k) for k in ("d_model", "n_layers", "n_heads")
            if getattr(args, k) is not None}
    cfg = GPTConfig.preset(args.model, meta["vocab_size"], max_seq_len=args.seq_len)
    if over:
        cfg = GPTConfig(**dict(cfg.to_dict(), d_ff=None, **over))
    model = GPT(cfg).to(device)
    opt = build_optimizer(args, model)
    selector = _build_selector(args, model, val)
    if rank == 0:  # validated and built: from here on the folder holds this run
        from thresher.data.runs import record_run

        record_run(args.out, run_settings(args))
    torch.manual_seed(args.seed * 7919 + rank + 1)  # per-rank stream (dropout, selectors)

    ckpt = os.path.join(args.out, "ckpt", f"rank{rank}.pt")
    start, tokens, wall0 = 0, 0, 0.0
    if args.resume and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if selector is not None and "selector" in state:
            selector.load_state_dict(state["selector"])
        set_rng_state(state["rng"])
        start, tokens, wall0 = int(state["step"]), int(state["tokens"]), float(state["wall_s"])

    def save(step):
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state(),
                 "step": torch.tensor(step), "tokens": torch.tensor(tokens),
                 "wall_s": torch.tensor(wall0 + time.perf_counter() - t0, dtype=torch.float64)}
        if selector is not None:
            state["selector"] = selector.state_dict()
        atomic_save(state, ckpt)

    def metric_mean(values):  # metrics only: not counted in the optimizer's bytes
        t = torch.tensor(values, dtype=torch.float64, device=device)
        all_reduce_mean_([t], info, "metrics all_reduce")
        return t.tolist()

    @torch.no_grad()
    def evaluate():
        model.eval()
        tot, cnt = 0.0, 0.0
        for s in range(0, len(val_idx), args.batch_size):
            idx = val_idx[s:s + args.batch_size]
            ids, lab = val.input_ids[idx].to(device), val.labels[idx].to(device)
            n = float((lab[:, 1:] != IGNORE_INDEX).sum())
            tot += float(model.loss(ids, lab, reduction="sum"))
            cnt += n
        model.train()
        tot, cnt = metric_mean([tot, cnt])
        return tot / max(cnt, 1.0)

    out_csv = os.path.join(args.out, "log.csv")
    rows = []
    if rank == 0 and args.resume and os.path.exists(out_csv):
        with open(out_csv) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=start, desc=f"train {args.optimizer}", unit="step",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    val_loss, last_train = float("nan"), float("nan")
    window_loss, window_n = 0.0, 0
    t_log, tok_log = time.perf_counter(), tokens
    for step in range(start + 1, args.steps + 1):
        lr = lr_at(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = _batch_indices(len(train), step, rank, world, args.batch_size, args.seed)
        ids, lab = train.input_ids[idx].to(device), train.labels[idx].to(device)
        kw = {}
        if selector is not None:
            alpha = selector.select(ids, lab)
            kw = {"sample_weight": alpha} if alpha.dim() == 1 else {"token_weight": alpha}
        loss = model.loss(ids, lab, **kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if selector is not None and hasattr(selector, "on_step"):
            selector.on_step()
        ntok = int((lab[:, 1:] != IGNORE_INDEX).sum()) * world  # every rank's batch has this shape
        tokens += ntok
        window_loss += float(loss.detach())
        window_n += 1
        is_eval = step % args.eval_every == 0 or step == args.steps
        if is_eval:
            last_train = metric_mean([window_loss / window_n])[0]
            window_loss, window_n = 0.0, 0
            val_loss = evaluate()
            now = time.perf_counter()
            tps = (tokens - tok_log) / max(now - t_log, 1e-9)
            t_log, tok_log = now, tokens
            if rank == 0:
                rows.append({"step": step, "tokens": tokens, "train_loss": f"{last_train:.5f}",
                             "val_loss": f"{val_loss:.5f}", "comm_bytes": opt.comm_bytes,
                             "wall_s": f"{wall0 + now - t0:.2f}", "tokens_per_s": f"{tps:.0f}",
                             "lr": f"{lr:.3e}"})
                _write_csv(out_csv, rows)
        if bar is not None:
            bar.update(1)
            post = {"loss": f"{float(loss.detach()):.3f}"}
            if val_loss == val_loss:  # no "val=nan" before the first evaluation
                post["val"] = f"{val_loss:.3f}"
            bar.set_postfix(**post, MB=f"{opt.comm_bytes / 2**20:.1f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            save(step)
    if bar is not None:
        bar.close()
    wall = wall0 + time.perf_counter() - t0
    summary = {"optimizer": args.optimizer, "world": world, "steps": args.steps,
               "tokens": tokens, "final_val_loss": val_loss, "final_train_loss": last_train,
               "comm_bytes_per_rank": opt.comm_bytes, "wall_s": wall,
               "tokens_per_s": tokens / max(wall, 1e-9),
               "optimizer_state_bytes": opt.state_bytes()
               if hasattr(opt, "state_bytes") else None,
               "model_parameters": model.num_parameters()}
    if rank == 0:
        from thresher.core.files import atomic_open

        with atomic_open(os.path.join(args.out, "summary.json")) as f:
            json.dump(summary, f, indent=1)
        if not args.no_plot:
            plot_loss_vs_bytes([(args.optimizer, rows)], os.path.join(args.out, "loss_vs_bytes.png"))
    if dist.is_initialized():
        from thresher.comm.collectives import barrier

        barrier(info, "end-of-training barrier")
    return summary


def _write_csv(path, rows):
    from thresher.core.files import atomic_open

    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot_loss_vs_bytes(series, path, title="validation loss vs bytes sent per rank"):
    """series: [(label, rows with comm_bytes and val_loss)] -> a log-x plot at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in series:
        xs = [max(float(r["comm_bytes"]), 1.0) for r in rows]
        ys = [float(r["val_loss"]) for r in rows]
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per rank (log)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    """A spawned rank must not outlive its launcher (killed, or dead of a signal): a daemon
    thread ends the rank once its parent is gone."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


# errors a rank reports as one line (bad input), like the launcher's own
_USER_ERRORS = ("ValueError", "TypeError", "FileNotFoundError", "PermissionError", "ImportError")


def _spawned(rank, world, port, args, queue, parent):
    import torch.distributed as dist

    _exit_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
        summary = train_rank(args, rank, world)
        dist.destroy_process_group()
        queue.put((rank, "ok", json.dumps(summary)))
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launcher says it once
        raise SystemExit(130)
    except BaseException as exc:
        import traceback

        if type(exc).__name__ in _USER_ERRORS:
            queue.put((rank, "user", f"{exc}"))
        else:
            queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def validate_args(args) -> None:
    """Everything that can be checked before a file is written."""
    for name in ("steps", "batch_size", "nproc", "eval_every", "ckpt_every", "sync_every",
                 "seq_len", "eval_samples", "val_every_nth", "rank"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    for name in ("warmup", "weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.tokenizer == "bpe" and args.vocab_size < 260:
        raise ValueError(f"--vocab-size must be >= 260 for the BPE tokenizer, got {args.vocab_size}")
    if args.corpus != "embedded" and not os.path.exists(args.corpus):
        raise ValueError(f"--corpus {args.corpus!r}: no such file or folder")
    if args.val_corpus is not None and not os.path.exists(args.val_corpus):
        raise ValueError(f"--val-corpus {args.val_corpus!r}: no such file or folder")
    if args.select:
        from thresher.selection.online import ONLINE_SELECTORS

        if args.select not in ONLINE_SELECTORS:
            raise ValueError(f"--select must be one of {', '.join(ONLINE_SELECTORS)}, got {args.select!r}")
    if args.select_opt and not args.select:
        raise ValueError(f"--select-opt {' '.join(args.select_opt)} needs --select (the online selector "
                         "it configures)")
    _parse_opts(args.select_opt)


def launch(args) -> dict:
    """Runs the training (spawning --nproc ranks, or joining torchrun's group); returns rank
    0's summary."""
    from thresher.data.runs import check_run_folder

    validate_args(args)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    check_run_folder(args.out, run_settings(args), resume=args.resume, shared=torchrun)
    os.makedirs(args.out, exist_ok=True)
    if torchrun:
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=args.timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            prepare_data(args)
        from thresher.comm.collectives import barrier, resolve_group

        barrier(resolve_group(None, args.timeout), "data preparation barrier")
        summary = train_rank(args, rank, world)
        dist.destroy_process_group()
        return summary
    prepare_data(args)
    if args.nproc == 1:
        return train_rank(args, 0, 1)
    import torch.multiprocessing as mp

    from thresher.comm.collectives import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(r, args.nproc, port, args, queue, os.getpid()))
             for r in range(args.nproc)]
    results = {}
    try:
        for p in procs:
            p.start()
        while len(results) < args.nproc:
            if not queue.empty():
                rank, status, out = queue.get()
                results[rank] = (status, out)
                if status != "ok":
                    break
            elif not any(p.is_alive() for p in procs) and queue.empty():
                break
            else:
                time.sleep(0.1)
    except BaseException:  # Ctrl-C or a kill of the launcher: the ranks stop with it
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        raise
    # after a rank failed, the others are stuck in a collective: give them a moment, not the timeout
    failed = any(status != "ok" for status, _ in results.values())
    deadline = time.monotonic() + (10 if failed else args.timeout + 30)
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    while not queue.empty():
        rank, status, out = queue.get()
        results[rank] = (status, out)
    user = [f"rank {r}: {o}" for r, (s, o) in sorted(results.items()) if s == "user"]
    if user:  # a bad input found by a rank: one line, like the launcher's own checks
        raise ValueError(user[0])
    errors = [f"rank {r}: {o}" for r, (s, o) in sorted(results.items()) if s == "error"]
    if errors or 0 not in results:
        raise RuntimeError("thresher train failed:\n" + ("\n".join(errors) or
                                                          "rank 0 returned nothing"))
    return json.loads(results[0][1])


def run(args) -> int:
    summary = launch(args)
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    """``torchrun ... -m thresher.cli.train ARGS`` = ``thresher train ARGS`` (same errors)."""
    from thresher.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
