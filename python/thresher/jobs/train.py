"""Training as a Python object: ``TrainJob(TrainConfig(...)).run()`` trains the small GPT (or
your model) with any thresher optimizer on N ranks and returns the run's summary.

``thresher train`` is this job behind argparse: every flag is the field of the same name
(``--batch-size`` -> ``batch_size``). The data, batches, outputs and resume rules are in
docs/api.md#training.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from thresher.jobs.config import JobConfig, JobError

__all__ = ["TrainConfig", "TrainJob", "OPTIMIZERS", "plot_loss_vs_bytes", "lr_at"]

OPTIMIZERS = ("lordo", "lowrank-ddp", "ddp", "diloco", "sparseloco", "adamw", "lowrank-adam")
CSV_FIELDS = ("step", "tokens", "train_loss", "val_loss", "comm_bytes", "wall_s", "tokens_per_s",
              "lr")
# settings that may change when a run is resumed: they do not change the training
RESUMABLE_CHANGES = ("resume", "steps", "no_progress", "no_plot", "timeout", "threads",
                     "ckpt_every", "data_cache")


@dataclasses.dataclass
class TrainConfig(JobConfig):
    """One training run. The groups follow ``thresher train --help``."""

    # data
    corpus: str = "embedded"          # 'embedded' or a path (jsonl, parquet, .txt, folder, HF dataset dir)
    val_corpus: str | None = None     # validation documents (default: held out of corpus)
    text_field: str = "text"
    val_every_nth: int = 20           # without val_corpus, every n-th document validates
    embedded_size: str | int = "quick"  # 'quick', 'default' or a pool size >= 10
    tokenizer: str = "bpe"            # 'bpe' (trained, cached), 'byte' or a tokenizer path
    vocab_size: int = 4096
    seq_len: int = 128
    data_cache: str | None = None     # folder for the tokenised samples (default OUT/data)
    # model and schedule
    model: str = "tiny"               # GPT preset: tiny, small, base
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    steps: int = 300
    batch_size: int = 8               # samples per rank and step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"          # or 'constant'
    weight_decay: float = 0.0
    seed: int = 0
    # optimizer
    optimizer: str = "lordo"          # one of OPTIMIZERS
    rank: int = 32                    # low-rank r (lordo, lowrank-*)
    lowrank_embeddings: bool = False  # also project the embedding matrix
    sync_every: int = 16
    omega: float = 0.5
    mu: float = 1.0
    clip: float = 1.0
    outer: str = "nesterov"           # lordo's outer step: 'average' or 'nesterov'
    outer_lr: float | None = None     # default 0.7 DiLoCo / lordo nesterov, 1.0 SparseLoCo
    outer_momentum: float | None = None  # default 0.9 DiLoCo / lordo nesterov, 0 SparseLoCo
    compression: str | None = None    # lordo: codec for the sync (topk, quant8, ...)
    proj: str = "svd"                 # svd, power, random
    init_proj: str = "random"         # random, grad
    update_proj_gap: int = 50         # lowrank-ddp refresh period
    scale: float = 1.0                # lowrank-ddp GaLore scale
    topk: int = 64                    # sparseloco: values per chunk
    chunk: int = 4096
    bits: int = 2
    ef_beta: float = 0.95             # sparseloco error decay
    # selection
    select: str | None = None         # online selector (thresher.selection.online): blade, rho, ...
    select_opt: dict = dataclasses.field(default_factory=dict)  # its constructor's options
    # run
    nproc: int = 1                    # local gloo ranks to spawn
    timeout: float = 300.0            # collective timeout (s)
    threads: int | None = None        # torch threads per rank (default cores // ranks)
    eval_every: int = 50
    eval_samples: int = 64            # validation samples (all ranks)
    ckpt_every: int = 100
    out: str = "runs/train"
    resume: bool = False
    no_progress: bool = False
    no_plot: bool = False

    def settings(self) -> dict:
        """What ``OUT/run.json`` records and ``resume`` compares: the training settings, with
        the corpus and tokenizer files by content (a changed corpus is not resumed; a moved one
        is), and not ``out`` itself (a run folder may be moved or named by another path)."""
        settings = {k: v for k, v in sorted(self.to_dict().items())
                    if k not in RESUMABLE_CHANGES and k != "out"}
        for k in ("corpus", "val_corpus", "tokenizer"):
            settings[k] = _content(settings[k])
        return settings

    def validate(self) -> None:
        """Everything that can be checked before a file is written (a JobError names the flag)."""
        self._check_at_least(1, "steps", "batch_size", "nproc", "eval_every", "ckpt_every", "sync_every",
                             "eval_samples", "val_every_nth", "rank", "threads")
        self._check_at_least(2, "seq_len")
        self._check_at_least(0, "warmup", "weight_decay")
        for name in ("lr", "timeout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise JobError(f"--{name} must be a positive number, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise JobError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", ("cosine", "constant")),
                              ("outer", ("average", "nesterov")), ("proj", ("svd", "power", "random")),
                              ("init_proj", ("random", "grad"))):
            if getattr(self, name) not in choices:
                raise JobError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                               f"got {getattr(self, name)!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            raise JobError(f"--vocab-size must be >= 260 for the BPE tokenizer, got {self.vocab_size}")
        if self.corpus == "embedded":
            from thresher.jobs.sources import embedded_size

            embedded_size(self.embedded_size)
        elif not os.path.exists(self.corpus):
            raise JobError(f"--corpus {self.corpus!r}: no such file or folder")
        if self.val_corpus is not None and not os.path.exists(self.val_corpus):
            raise JobError(f"--val-corpus {self.val_corpus!r}: no such file or folder")
        if self.data_cache is not None and os.path.exists(self.data_cache) \
                and not os.path.isdir(self.data_cache):
            raise JobError(f"--data-cache {self.data_cache!r} exists and is not a folder")
        if self.select:
            from thresher.selection.registry import ONLINE

            if self.select not in ONLINE.names():  # the built-in ones and those registered since
                raise JobError(f"--select must be one of {', '.join(ONLINE.names())}, "
                               f"got {self.select!r}")
        if self.select_opt and not self.select:
            opts = " ".join(f"{k}={json.dumps(v)}" for k, v in self.select_opt.items())
            raise JobError(f"--select-opt {opts} needs --select (the online selector it configures)")
        _check_named_parts(self)

    # -- data --------------------------------------------------------------------------------
    def data_dir(self, settings: dict | None = None) -> str:
        """The cache folder of this run's tokenised samples: keyed on the data settings and the
        *content* of the corpus and tokenizer files (a changed corpus is tokenised again).
        ``settings``: this config's :meth:`settings`, when the caller has them (fingerprinting
        reads every byte of the corpus, so a run does it once)."""
        s = self.settings() if settings is None else settings
        desc = json.dumps([s["corpus"], s["val_corpus"], self.text_field, self.val_every_nth,
                           self.embedded_size, s["tokenizer"], self.vocab_size, self.seq_len])
        key = hashlib.sha1(desc.encode()).hexdigest()[:12]
        return os.path.join(self.data_cache or os.path.join(self.out, "data"), key)


def _content(path):
    """A corpus or tokenizer argument with the fingerprint of what it names (None, 'embedded',
    'bpe' and 'byte' name no file)."""
    from thresher.data.runs import fingerprint

    if path is None or path in ("embedded", "bpe", "byte") or not os.path.exists(path):
        return path
    return [os.path.abspath(path), fingerprint(path)]


def prepare_data(cfg: TrainConfig, settings: dict | None = None) -> str:
    """Tokenises and packs the corpus once; returns the folder holding train/ and val/."""
    from thresher.core.files import atomic_open
    from thresher.data import Document, embedded_corpus, load_tokenizer, pack, read_documents
    from thresher.jobs.sources import embedded_size

    folder = cfg.data_dir(settings)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    if cfg.corpus == "embedded":
        corpus = embedded_corpus(seed=0, size=embedded_size(cfg.embedded_size))
        train_docs, val_docs = corpus.pool, corpus.target
    else:
        docs = list(read_documents(cfg.corpus, cfg.text_field))
        if cfg.val_corpus:
            train_docs = docs
            val_docs = list(read_documents(cfg.val_corpus, cfg.text_field))
        else:
            n = cfg.val_every_nth
            train_docs = [d for i, d in enumerate(docs) if i % n]
            val_docs = [d for i, d in enumerate(docs) if not i % n]
    if not train_docs or not val_docs:
        raise ValueError(f"corpus {cfg.corpus!r} gave {len(train_docs)} training and "
                         f"{len(val_docs)} validation documents; need at least one of each")
    tok = load_tokenizer(cfg.tokenizer, train_docs=train_docs, vocab_size=cfg.vocab_size)

    def renum(ds):  # pack wants increasing ids
        return [Document(i, d.text, d.meta) for i, d in enumerate(ds)]

    train = pack(renum(train_docs), tok, cfg.seq_len)
    val = pack(renum(val_docs), tok, cfg.seq_len)
    train.save(os.path.join(folder, "train"))
    val.save(os.path.join(folder, "val"))
    with atomic_open(os.path.join(folder, "meta.json")) as f:
        json.dump({"vocab_size": tok.vocab_size, "train_samples": len(train),
                   "val_samples": len(val), "train_tokens": int(train.num_tokens)}, f)
    return folder


def model_config(cfg: TrainConfig, vocab_size: int):
    """The ``GPTConfig`` of the model ``cfg`` names: the preset, with the given overrides."""
    from thresher.models.gpt import GPTConfig

    over = {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads") if getattr(cfg, k) is not None}
    gcfg = GPTConfig.preset(cfg.model, vocab_size, max_seq_len=cfg.seq_len)
    return GPTConfig(**dict(gcfg.to_dict(), d_ff=None, **over)) if over else gcfg


def build_optimizer(cfg: TrainConfig, model):
    """The optimizer ``cfg.optimizer`` names, for this rank's model."""
    from thresher.optim import DDPAdamW, DiLoCo, LoRDO, LowRankDDP, SparseLoCo

    name, lr, wd, timeout = cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.timeout
    if name in ("ddp", "adamw"):
        return DDPAdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95),
                        timeout=timeout)
    if name == "diloco":
        return DiLoCo(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95),
                      sync_every=cfg.sync_every, timeout=timeout,
                      outer_lr=0.7 if cfg.outer_lr is None else cfg.outer_lr,
                      outer_momentum=0.9 if cfg.outer_momentum is None else cfg.outer_momentum)
    if name == "sparseloco":
        return SparseLoCo(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95),
                          sync_every=cfg.sync_every, beta=cfg.ef_beta, k=cfg.topk,
                          chunk=cfg.chunk, bits=cfg.bits, timeout=timeout,
                          outer_lr=1.0 if cfg.outer_lr is None else cfg.outer_lr,
                          outer_momentum=0.0 if cfg.outer_momentum is None else cfg.outer_momentum)
    # the low-rank methods project the 2-D weights; the embedding (unless asked) and the
    # vectors take plain Adam, as GaLore does
    emb = getattr(getattr(model, "embed", None), "weight", None)
    skip = {id(emb)} if emb is not None and not cfg.lowrank_embeddings else set()
    mats = [p for p in model.parameters() if p.dim() == 2 and id(p) not in skip]
    rest = [p for p in model.parameters() if not (p.dim() == 2 and id(p) not in skip)]
    if name in ("lowrank-ddp", "lowrank-adam"):
        groups = [{"params": mats, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
                   "scale": cfg.scale}, {"params": rest, "rank": None}]
        return LowRankDDP(groups, lr=lr, weight_decay=wd, betas=(0.9, 0.95), proj=cfg.proj,
                          timeout=timeout)
    nesterov = cfg.outer == "nesterov"
    groups = [{"params": mats, "rank": cfg.rank}, {"params": rest, "rank": None}]
    return LoRDO(groups, lr=lr, sync_every=cfg.sync_every, omega=cfg.omega, mu=cfg.mu,
                 clip=cfg.clip, betas=(0.9, 0.95), weight_decay=wd, outer=cfg.outer,
                 outer_lr=(0.7 if nesterov else 1.0) if cfg.outer_lr is None else cfg.outer_lr,
                 outer_momentum=(0.9 if nesterov else 0.0) if cfg.outer_momentum is None
                 else cfg.outer_momentum,
                 compression=cfg.compression, proj=cfg.proj, init_proj=cfg.init_proj,
                 seed=cfg.seed, timeout=timeout)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up then cosine to min_lr_ratio * lr (or constant). step counts from 1."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, frac)))


def batch_indices(n: int, step: int, rank: int, world: int, batch: int, seed: int):
    """Samples of ``rank`` at ``step`` (from 1): epochs of a permutation all ranks share, so
    a run is deterministic and resuming needs only the step number."""
    import torch

    per_step = world * batch
    steps_per_epoch = max(1, n // per_step)
    epoch, i = divmod(step - 1, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < per_step:  # tiny corpus: wrap around
        perm = perm.repeat(-(-per_step // n))
    start = i * per_step + rank * batch
    return perm[start:start + batch]


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


# A part given to TrainJob is an instance when it has its defining method; anything else is
# a factory called on each rank: model(cfg, vocab_size), optimizer(cfg, model),
# selector(cfg, model, val_samples).
_INSTANCE_MARK = {"model": "parameters", "optimizer": "step", "selector": "select"}


def _is_instance(key: str, part) -> bool:
    return not isinstance(part, type) and hasattr(part, _INSTANCE_MARK[key])


def _check_given_parts(cfg: TrainConfig, parts: dict, in_group: bool) -> None:
    """The parts a caller gives, checked before any work: an instance stays in this process
    (nproc=1 or the caller's group), an optimizer or selector instance was built on the model
    instance given with it, and a factory for spawned ranks pickles."""
    instances = [k for k, v in parts.items() if v is not None and _is_instance(k, v)]
    if instances and cfg.nproc > 1 and not in_group:
        raise JobError(f"{', '.join(instances)}: an instance cannot be sent to {cfg.nproc} "
                       "spawned ranks; pass a factory, or nproc=1")
    model = parts["model"] if "model" in instances else None
    for key in ("optimizer", "selector"):
        if key in instances and model is None:
            raise JobError(f"{key}: an instance needs the model it was built on (model=...); "
                           f"without it, pass a factory {key}(cfg, model{', val_samples' * (key == 'selector')})")
    if "optimizer" in instances:
        mine = {id(p) for p in model.parameters()}
        if any(id(p) not in mine for g in parts["optimizer"].param_groups for p in g["params"]):
            raise JobError("optimizer: the instance holds parameters that are not the model's; "
                           "build it on the model given as model=...")
    if "selector" in instances and getattr(parts["selector"], "model", model) is not model:
        raise JobError("selector: the instance was built on another model than model=...")
    if cfg.nproc > 1 and not in_group:
        import pickle

        for key, factory in parts.items():
            if factory is not None:
                try:
                    pickle.dumps(factory)
                except Exception as e:
                    raise JobError(f"{key}: a factory for {cfg.nproc} spawned ranks must pickle (a "
                                   f"module-level function), got {factory!r} ({e})") from None


def _check_named_parts(cfg: TrainConfig) -> None:
    """Builds what the config names once, before any work: the model's GPTConfig, and the
    optimizer and the online selector on a one-layer stand-in of that model with a provisional
    vocabulary (the real ones are built on each rank after the data step). So a bad option is
    a JobError naming its flags, not a failure after tokenising. Inside a process group only
    the model is checked (the optimizers communicate when they are built)."""
    import torch
    import torch.distributed as dist

    from thresher.models.gpt import GPT, GPTConfig

    try:
        gcfg = model_config(cfg, 260)  # 256 bytes + specials: the smallest vocabulary
    except (TypeError, ValueError) as e:
        raise JobError(f"--model {cfg.model} (--d-model/--n-layers/--n-heads): {e}") from None
    if dist.is_initialized():
        return
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        stand_in = GPT(GPTConfig(**dict(gcfg.to_dict(), n_layers=1)))
        try:
            build_optimizer(cfg, stand_in)
        except (TypeError, ValueError) as e:
            raise JobError(f"--optimizer {cfg.optimizer} rejects its options: {e}") from None
        if cfg.select:
            from thresher.selection.online import build_online_selector

            try:
                build_online_selector(cfg.select, stand_in, torch.zeros(2, cfg.seq_len, dtype=torch.long),
                                      **cfg.select_opt)
            except (TypeError, ValueError) as e:
                raise JobError(f"--select {cfg.select} rejects --select-opt: {e}") from None


class _RankTrainer:
    """The training loop of one rank: build, resume, step, evaluate, log, checkpoint."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, parts: dict, settings: dict):
        import torch
        import torch.distributed as dist

        from thresher.comm.collectives import resolve_group
        from thresher.data import Samples

        self.cfg, self.rank, self.world = cfg, rank, world
        # ranks share the machine's cores: N ranks x default threads oversubscribes it (and
        # gloo's waits spin), so each rank gets cores // N threads unless told otherwise
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
        self.info = resolve_group(None, cfg.timeout)
        folder = cfg.data_dir(settings)
        self.train = Samples.load(os.path.join(folder, "train"))
        self.val = Samples.load(os.path.join(folder, "val"))
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.val_idx = torch.arange(min(len(self.val), cfg.eval_samples))[rank::world]
        # torchrun on GPUs (NCCL): one device per rank; everything else on the CPU
        if dist.is_initialized() and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(cfg.seed)  # same initial model on every rank
        self.model = self._part(parts, "model", self._default_model)
        self.model = self.model.to(self.device)
        self.opt = self._part(parts, "optimizer", build_optimizer, self.model)
        self.selector = self._part(parts, "selector", self._default_selector, self.model, self.val)
        # what the summary, log and plot call the optimizer: the config's name, or your class's
        self.opt_name = cfg.optimizer if parts.get("optimizer") is None else type(self.opt).__name__
        if rank == 0:  # validated and built: from here on the folder holds this run
            from thresher.data.runs import record_run

            record_run(cfg.out, settings)
            cfg.to_json(os.path.join(cfg.out, "config.json"))  # the whole config, to rerun it
        torch.manual_seed(cfg.seed * 7919 + rank + 1)  # per-rank stream (dropout, selectors)
        self.ckpt = os.path.join(cfg.out, "ckpt", f"rank{rank}.pt")
        self.out_csv = os.path.join(cfg.out, "log.csv")
        self.start, self.tokens, self.wall0 = 0, 0, 0.0
        # the losses since the last evaluation, and the last evaluation's: checkpointed, so a
        # resumed run logs what the uninterrupted one would (and a finished one its summary)
        self.window_loss, self.window_n = 0.0, 0
        self.val_loss, self.last_train = float("nan"), float("nan")
        self.rows: list[dict] = []

    # -- parts -------------------------------------------------------------------------------
    def _part(self, parts, key, default, *args):
        given = parts.get(key)
        if given is None:
            return default(self.cfg, *args)
        if _is_instance(key, given):  # one rank, or the caller's own process group
            return given
        return given(self.cfg, *((self.meta["vocab_size"],) if key == "model" else args))

    def _default_model(self, cfg):
        from thresher.models.gpt import GPT

        return GPT(model_config(cfg, self.meta["vocab_size"]))

    @staticmethod
    def _default_selector(cfg, model, val):
        if not cfg.select:
            return None
        from thresher.selection.online import build_online_selector

        return build_online_selector(cfg.select, model, val, **cfg.select_opt)

    # -- state -------------------------------------------------------------------------------
    def resume(self) -> None:
        import torch

        from thresher.core.rng import set_rng_state

        if self.cfg.resume and os.path.exists(self.ckpt):
            state = torch.load(self.ckpt, weights_only=True, map_location=self.device)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            if self.selector is not None and "selector" in state:
                self.selector.load_state_dict(state["selector"])
            set_rng_state(state["rng"])
            self.start, self.tokens = int(state["step"]), int(state["tokens"])
            self.wall0 = float(state["wall_s"])
            self.window_loss, window_n, self.val_loss, self.last_train = state["losses"].tolist()
            self.window_n = int(window_n)
        if self.rank == 0 and self.cfg.resume and os.path.exists(self.out_csv):
            with open(self.out_csv) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.start]

    def save(self, step: int) -> None:
        import torch

        from thresher.core.files import atomic_save
        from thresher.core.rng import rng_state

        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "rng": rng_state(), "step": torch.tensor(step),
                 "tokens": torch.tensor(self.tokens),
                 "wall_s": torch.tensor(self.wall(), dtype=torch.float64),
                 "losses": torch.tensor([self.window_loss, self.window_n, self.val_loss, self.last_train],
                                        dtype=torch.float64)}
        if self.selector is not None:
            state["selector"] = self.selector.state_dict()
        atomic_save(state, self.ckpt)

    def wall(self) -> float:
        return self.wall0 + time.perf_counter() - self.t0

    # -- metrics -----------------------------------------------------------------------------
    def metric_mean(self, values):
        """Mean over the ranks (metrics only: not counted in the optimizer's bytes)."""
        import torch

        from thresher.comm.collectives import all_reduce_mean_

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        all_reduce_mean_([t], self.info, "metrics all_reduce")
        return t.tolist()

    def evaluate(self) -> float:
        """Validation loss per token: each rank's model on its shard, averaged over ranks."""
        import torch

        from thresher.core.constants import IGNORE_INDEX

        self.model.eval()
        tot, cnt = 0.0, 0.0
        with torch.no_grad():
            for s in range(0, len(self.val_idx), self.cfg.batch_size):
                idx = self.val_idx[s:s + self.cfg.batch_size]
                ids = self.val.input_ids[idx].to(self.device)
                lab = self.val.labels[idx].to(self.device)
                cnt += float((lab[:, 1:] != IGNORE_INDEX).sum())
                tot += float(self.model.loss(ids, lab, reduction="sum"))
        self.model.train()
        tot, cnt = self.metric_mean([tot, cnt])
        return tot / max(cnt, 1.0)

    # -- the loop ----------------------------------------------------------------------------
    def step(self, step: int):
        """One optimizer step; returns (loss, lr)."""
        from thresher.core.constants import IGNORE_INDEX

        cfg = self.cfg
        lr = lr_at(cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(len(self.train), step, self.rank, self.world, cfg.batch_size, cfg.seed)
        ids = self.train.input_ids[idx].to(self.device)
        lab = self.train.labels[idx].to(self.device)
        kw = {}
        if self.selector is not None:
            alpha = self.selector.select(ids, lab)
            kw = {"sample_weight": alpha} if alpha.dim() == 1 else {"token_weight": alpha}
        loss = self.model.loss(ids, lab, **kw)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.selector is not None and hasattr(self.selector, "on_step"):
            self.selector.on_step()
        # every rank's batch has this shape
        self.tokens += int((lab[:, 1:] != IGNORE_INDEX).sum()) * self.world
        return float(loss.detach()), lr

    def run(self) -> dict:
        cfg = self.cfg
        self.resume()
        bar = None
        if self.rank == 0 and not cfg.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start, desc=f"train {self.opt_name}",
                       unit="step", dynamic_ncols=True)
        self.t0 = time.perf_counter()
        t_log, tok_log = time.perf_counter(), self.tokens
        comm = lambda: getattr(self.opt, "comm_bytes", 0)  # noqa: E731  (a torch optimizer sends nothing)
        for step in range(self.start + 1, cfg.steps + 1):
            loss, lr = self.step(step)
            self.window_loss += loss
            self.window_n += 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                self.last_train = self.metric_mean([self.window_loss / self.window_n])[0]
                self.window_loss, self.window_n = 0.0, 0
                self.val_loss = val_loss = self.evaluate()
                now = time.perf_counter()
                tps = (self.tokens - tok_log) / max(now - t_log, 1e-9)
                t_log, tok_log = now, self.tokens
                if self.rank == 0:
                    self.rows.append({"step": step, "tokens": self.tokens,
                                      "train_loss": f"{self.last_train:.5f}", "val_loss": f"{val_loss:.5f}",
                                      "comm_bytes": comm(), "wall_s": f"{self.wall():.2f}",
                                      "tokens_per_s": f"{tps:.0f}", "lr": f"{lr:.3e}"})
                    _write_csv(self.out_csv, self.rows)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{loss:.3f}"}
                if self.val_loss == self.val_loss:  # no "val=nan" before the first evaluation
                    post["val"] = f"{self.val_loss:.3f}"
                bar.set_postfix(**post, MB=f"{comm() / 2**20:.1f}")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                self.save(step)
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict:
        import torch.distributed as dist

        wall = self.wall()
        opt, model = self.opt, self.model
        summary = {"optimizer": self.opt_name, "world": self.world, "steps": self.cfg.steps,
                   "tokens": self.tokens, "final_val_loss": self.val_loss,
                   "final_train_loss": self.last_train,
                   "comm_bytes_per_rank": getattr(opt, "comm_bytes", 0), "wall_s": wall,
                   "tokens_per_s": self.tokens / max(wall, 1e-9),
                   "optimizer_state_bytes": opt.state_bytes() if hasattr(opt, "state_bytes") else None,
                   "model_parameters": model.num_parameters() if hasattr(model, "num_parameters")
                   else sum(p.numel() for p in model.parameters())}
        if self.rank == 0:
            from thresher.core.files import atomic_open

            with atomic_open(os.path.join(self.cfg.out, "summary.json")) as f:
                json.dump(summary, f, indent=1)
            if not self.cfg.no_plot:
                plot_loss_vs_bytes([(self.opt_name, self.rows)],
                                   os.path.join(self.cfg.out, "loss_vs_bytes.png"))
        if dist.is_initialized():
            from thresher.comm.collectives import barrier

            barrier(self.info, "end-of-training barrier")
        return summary


def _train_rank(rank: int, world: int, cfg: TrainConfig, parts: dict, settings: dict) -> dict:
    import torch

    threads = torch.get_num_threads()
    try:
        return _RankTrainer(cfg, rank, world, parts, settings).run()
    finally:  # a run in the caller's process leaves its thread setting as it was
        torch.set_num_threads(threads)


class TrainJob:
    """Trains ``config`` and returns its summary (``run``). ``model``, ``optimizer`` and
    ``selector`` replace the parts the config names: an instance (one rank, or a process group
    your code already initialised) or a factory (``model(cfg, vocab_size)``,
    ``optimizer(cfg, model)``, ``selector(cfg, model, val_samples)``; it must pickle when
    ``nproc > 1``). A model needs ``loss(input_ids, labels, reduction=..., sample_weight=...,
    token_weight=...)`` as :class:`thresher.models.GPT` has."""

    def __init__(self, config: TrainConfig, *, model=None, optimizer=None, selector=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.parts = {"model": model, "optimizer": optimizer, "selector": selector}

    def run(self) -> dict:
        """Runs the training (spawning ``nproc`` ranks, or joining torchrun's group); returns
        rank 0's summary (also written to ``OUT/summary.json``). Every check runs before
        anything is written; a run that fails before it is recorded leaves ``out`` as it was."""
        from thresher.jobs.folders import open_out, undo_unrecorded
        from thresher.jobs.launch import in_group, run_on_ranks

        cfg = self.config
        cfg.validate()
        grouped = in_group()
        _check_given_parts(cfg, self.parts, grouped)
        # (the default data cache is written before the run is recorded)
        pre_run = ("data",) if cfg.data_cache is None else ()
        settings = cfg.settings()  # fingerprints the corpus: once, then handed to every rank
        fresh = open_out(cfg.out, settings, resume=cfg.resume, shared=grouped, pre_run=pre_run)
        try:
            return run_on_ranks(_train_rank, cfg.nproc, cfg.timeout, cfg, self.parts, settings,
                                before=lambda: prepare_data(cfg, settings), name="train")
        except BaseException:
            if not grouped:
                undo_unrecorded(cfg.out, fresh, pre_run)
            raise
