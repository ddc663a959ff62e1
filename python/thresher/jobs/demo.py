"""The end-to-end demo as a Python object: ``DemoJob(DemoConfig(quick=True)).run()``.

Stages: data (pool, target halves, BPE), select (BLISS, loss filtering, random keep
``fraction`` of the pool), train (TrainJob with LoRDO per selection, DDPAdamW once), online
(one BLADE run), report (table, ``OUT/report.md``, curves). ``resume`` reuses finished
stages and resumes an interrupted training run. docs/api.md#demo has the details.
"""
from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from thresher.jobs.config import JobConfig, JobError

__all__ = ["DemoConfig", "DemoJob", "MODES"]

# Sizes per mode. quick: what CI runs (about 2 min on 2 idle cores); default: about 8-9 min.
MODES = {
    "quick": dict(embedded="quick", max_pool_docs=400, vocab=1024, seq_len=64, steps=60,
                  batch=8, eval_every=20,
                  bliss=dict(warmup_steps=80, outer_steps=25, warmup_lr=2e-3,
                             model=dict(d_model=64, n_layers=2, n_heads=2)),
                  loss=dict(steps=150), blade=dict(tau=10, ref_steps=10, ref_lr=3e-3),
                  model=dict(d_model=64, n_layers=2, n_heads=2), sync_every=8, rank=16),
    "default": dict(embedded="default", max_pool_docs=2000, vocab=4096, seq_len=128, steps=200,
                    batch=8, eval_every=40,
                    bliss=dict(warmup_steps=100, outer_steps=30, warmup_lr=2e-3,
                               model=dict(d_model=64, n_layers=2, n_heads=2)),
                    loss=dict(steps=150), blade=dict(tau=25, ref_steps=5, ref_lr=3e-3),
                    model=dict(), sync_every=16, rank=32),
}


@dataclass
class Run:
    name: str
    selection: str
    optimizer: str
    summary: dict
    curve: list = field(default_factory=list)  # [(tokens, val_loss)]


@dataclass
class DemoConfig(JobConfig):
    """The demo's settings (``thresher demo`` flags of the same names)."""

    pool: str = "embedded"          # 'embedded' or a path (jsonl, parquet, .txt, folder, HF dataset dir)
    target: str = "embedded"        # target documents ('embedded': the embedded corpus's target split)
    text_field: str = "text"
    fraction: float = 0.2           # fraction of the pool to keep
    nproc: int = 2                  # local gloo ranks for training
    steps: int | None = None        # training steps per run (default: the mode's)
    max_pool_docs: int | None = None  # score at most this many pool documents (0 = all)
    seed: int = 0
    quick: bool = False             # small sizes (about 2 minutes)
    out: str = "thresher-demo"
    resume: bool = False            # reuse finished stages in out

    def validate(self) -> None:
        """What can be checked before a file is written (a JobError names the flag)."""
        if not 0.0 < self.fraction <= 1.0:
            raise JobError(f"--fraction must be in (0, 1], got {self.fraction}")
        self._check_at_least(1, "nproc", "steps")
        self._check_at_least(0, "max_pool_docs", "seed")  # (seed: the embedded corpus takes no negative one)
        for name in ("pool", "target"):
            v = getattr(self, name)
            if v != "embedded" and not Path(v).exists():
                raise JobError(f"--{name} {v!r}: no such file or folder")
        if (self.pool == "embedded") != (self.target == "embedded"):
            raise JobError("--pool and --target must both be 'embedded' or both be paths")


class DemoJob:
    """Runs the demo of ``config``; ``run()`` returns the report (rows, stage times, sizes)
    that ``OUT/report.json`` holds."""

    def __init__(self, config: DemoConfig):
        if not isinstance(config, DemoConfig):
            raise TypeError(f"config must be a DemoConfig, got {type(config).__name__}")
        self.config = config

    def run(self) -> dict:
        from thresher.jobs.folders import open_out, undo_unrecorded

        config = self.config
        config.validate()
        out = Path(config.out)
        # what resume compares: not out itself (a run folder may be moved or named by another path)
        settings = {k: v for k, v in sorted(config.to_dict().items()) if k not in ("resume", "out")}
        pre_run = ("data", "stages.json")  # written before the run is recorded (stage 1)
        fresh = open_out(out, settings, resume=config.resume, pre_run=pre_run)
        clock = _Clock(out / "stages.json")
        try:
            return _pipeline(config, MODES["quick" if config.quick else "default"], out, clock, settings)
        except BaseException:
            clock.end()
            # failed on its inputs before the run was recorded: leave the folder as it was, so
            # that the corrected command can use it
            undo_unrecorded(out, fresh, pre_run)
            raise
        finally:
            clock.end()  # an interrupted stage keeps its time for the resumed run's report


def _add_time(path: Path, key: str, seconds: float) -> None:
    from thresher.core.files import save_json

    times = json.loads(path.read_text()) if path.is_file() else {}
    times[key] = times.get(key, 0.0) + seconds
    save_json(path, times)


@contextlib.contextmanager
def _timed(path: Path, key: str):
    """Adds the wall time of the block to ``path[key]``, also when it is interrupted, so a
    resumed run's times are the sum of its parts."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _add_time(path, key, time.perf_counter() - t0)


class _Clock:
    """Wall time per stage: this invocation's (``this_run``) and, in ``OUT/stages.json``, the
    sum over every part of a resumed run (an interrupted stage's time included)."""

    def __init__(self, path: Path):
        self.path, self.this_run, self.name = path, {}, None
        self.parts = (json.loads(path.read_text()).get("parts", 0) if path.is_file() else 0) + 1
        _add_time(path, "parts", 1)

    def begin(self, name: str) -> None:
        self.end()
        self.name, self.t0 = name, time.perf_counter()

    def end(self) -> None:
        if self.name is not None:
            dt = time.perf_counter() - self.t0
            self.this_run[self.name] = dt
            _add_time(self.path, self.name, dt)
            self.name = None

    def totals(self) -> dict:
        return {k: v for k, v in json.loads(self.path.read_text()).items() if k != "parts"}


# ----------------------------------------------------------------------------------------
# Stage 1: data
# ----------------------------------------------------------------------------------------


def stage_data(config, mode, out: Path) -> dict:
    from thresher.data import Document, embedded_corpus, load_tokenizer, pack, read_documents, \
        write_documents

    labels = None
    if config.pool == "embedded":
        corpus = embedded_corpus(seed=config.seed, size=mode["embedded"])
        pool, target, labels = corpus.pool, corpus.target, corpus.labels
    else:
        pool = list(read_documents(config.pool, config.text_field))
        target = list(read_documents(config.target, config.text_field))
    cap = mode["max_pool_docs"] if config.max_pool_docs is None else config.max_pool_docs
    if cap and len(pool) > cap:  # an even spread keeps the mix of sources and corruptions
        import numpy as np

        keep = np.unique(np.linspace(0, len(pool) - 1, cap).round().astype(np.int64))
        pool = [pool[i] for i in keep]
        labels = None if labels is None else np.asarray(labels)[keep]
    if not pool or len(target) < 2:
        raise ValueError(f"need a non-empty pool and at least 2 target documents, got "
                         f"{len(pool)} and {len(target)}")
    # Halve the target: selectors see one half, every training run validates on the other.
    guide = [d for i, d in enumerate(target) if i % 2 == 0]
    held = [d for i, d in enumerate(target) if i % 2 == 1]
    renum = lambda ds: [Document(i, d.text, d.meta) for i, d in enumerate(ds)]  # noqa: E731
    pool, guide, held = renum(pool), renum(guide), renum(held)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("bpe", train_docs=pool + guide, vocab_size=mode["vocab"],
                         cache_dir=data / "tokenizer")
    write_documents(pool, data / "pool.jsonl")
    write_documents(held, data / "val.jsonl")
    return dict(pool=pool, labels=labels, tok=tok,
                pool_samples=pack(pool, tok, mode["seq_len"]),
                guide_samples=pack(guide, tok, mode["seq_len"]),
                val_path=str(data / "val.jsonl"), pool_path=str(data / "pool.jsonl"),
                sizes=dict(pool_docs=len(pool), target_docs=len(guide), val_docs=len(held)))


# ----------------------------------------------------------------------------------------
# Stage 2: scoring and selection
# ----------------------------------------------------------------------------------------


def stage_select(config, mode, out: Path, d: dict) -> dict:
    import numpy as np

    from thresher.data import write_documents
    from thresher.selection.base import build_scorer
    from thresher.selection.metrics import auroc
    from thresher.selection.strategies import select_topk

    results = {}
    methods = {"bliss": mode["bliss"], "loss": dict(mode["loss"], model=mode["model"] or "tiny"),
               "random": {}}
    for method, opts in methods.items():
        folder = out / "select" / method
        sel_path = folder / "selected.jsonl"
        if not (config.resume and sel_path.exists() and (folder / "doc_scores.npy").exists()):
            folder.mkdir(parents=True, exist_ok=True)
            with _timed(folder / "time.json", "wall_s"):
                scorer = build_scorer(method, vocab_size=d["tok"].vocab_size, seed=config.seed, **opts)
                scorer.fit(d["pool_samples"], d["guide_samples"], checkpoint_dir=folder / "ckpt",
                           resume=config.resume, progress=True)
                scores = scorer.score(d["pool_samples"], progress=True)
                doc_scores = d["pool_samples"].doc_scores(scores)
                keep = select_topk(doc_scores, config.fraction)
                np.save(folder / "doc_scores.npy", doc_scores.astype(np.float32))
                write_documents([d["pool"][i] for i in keep], sel_path)
        doc_scores = np.load(folder / "doc_scores.npy")
        wall = json.loads((folder / "time.json").read_text())["wall_s"]
        keep = select_topk(doc_scores, config.fraction)
        info = dict(path=str(sel_path), docs=len(keep), wall_s=wall)
        if d["labels"] is not None:
            info["auroc"] = auroc(doc_scores, ~np.asarray(d["labels"], dtype=bool))
            info["corrupt_kept"] = float(np.asarray(d["labels"])[keep].mean())
        results[method] = info
        extra = ""
        if "auroc" in info:
            extra = f", AUROC {info['auroc']:.3f}, corrupted {info['corrupt_kept']:.0%} of those kept"
        print(f"      {method}: {info['docs']} docs in {info['wall_s']:.1f} s{extra}", flush=True)
    return results


# ----------------------------------------------------------------------------------------
# Stage 3/4: training
# ----------------------------------------------------------------------------------------


def _train(config, mode, out: Path, d: dict, name: str, corpus: str, optimizer: str,
           extra: dict | None = None) -> Run:
    from thresher.jobs.train import TrainConfig, TrainJob

    steps = config.steps or mode["steps"]
    train_config = TrainConfig(corpus=corpus, val_corpus=d["val_path"], tokenizer=d["tok"].path,
                       seq_len=mode["seq_len"], model="tiny", steps=steps, batch_size=mode["batch"],
                       eval_every=mode["eval_every"], optimizer=optimizer, nproc=config.nproc,
                       seed=config.seed, rank=mode["rank"], sync_every=mode["sync_every"],
                       out=str(out / "train" / name), ckpt_every=max(steps // 2, 1),
                       no_plot=True, threads=1, resume=config.resume,
                       **{k: mode["model"][k] for k in ("d_model", "n_layers", "n_heads")
                          if k in mode["model"]},
                       **(extra or {}))
    summary_path = out / "train" / name / "summary.json"
    if config.resume and summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        summary = TrainJob(train_config).run()
    curve = []
    with open(out / "train" / name / "log.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val_loss"):
                curve.append((float(row["tokens"]), float(row["val_loss"])))
    return Run(name, corpus, optimizer, summary, curve)


# ----------------------------------------------------------------------------------------
# Stage 5: report
# ----------------------------------------------------------------------------------------


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def build_table(runs: list[Run], selection: dict, stage_s: dict) -> tuple[list[dict], str]:
    from thresher.selection.metrics import tokens_to_target_speedup

    base = next((r for r in runs if r.name == "random+lordo"), None)
    rows = []
    for r in runs:
        sel = r.name.split("+")[0]
        s = r.summary
        rows.append({
            "run": r.name,
            "selection": sel,
            "optimizer": r.optimizer,
            "val_loss": s.get("final_val_loss"),
            "speedup_vs_random": (tokens_to_target_speedup(base.curve, r.curve)
                                  if base and r.curve and base.curve else None),
            "bytes_per_rank": s.get("comm_bytes_per_rank"),
            "opt_state_bytes": s.get("optimizer_state_bytes"),
            "train_wall_s": s.get("wall_s"),
            "select_wall_s": selection.get(sel, {}).get("wall_s"),
            "auroc": selection.get(sel, {}).get("auroc"),
            "corrupt_kept": selection.get(sel, {}).get("corrupt_kept"),
        })
    head = ("| run | val loss | tokens-to-target vs random | bytes sent / rank | "
            "optimizer state / rank | train s | selection s | corrupted-doc AUROC | corrupted kept |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731

    def speed(v):  # tokens_to_target_speedup is 0 for a run that never reaches the target
        return "n/a" if v is None else ("not reached" if v == 0 else f"{v:.2f}x")

    body = "".join(
        f"| {r['run']} | {f(r['val_loss'], '.4f')} | {speed(r['speedup_vs_random'])} | "
        f"{_fmt_bytes(r['bytes_per_rank'])} | {_fmt_bytes(r['opt_state_bytes'])} | "
        f"{f(r['train_wall_s'], '.1f')} | {f(r['select_wall_s'], '.1f')} | {f(r['auroc'], '.3f')} | "
        f"{f(r['corrupt_kept'], '.0%')} |\n"
        for r in rows)
    stages = "| stage | wall s |\n|---|---:|\n" + "".join(
        f"| {k} | {v:.1f} |\n" for k, v in stage_s.items())
    return rows, head + body + "\n" + stages


COLUMNS = """\
How to read the table (one row per training run: `SELECTION+OPTIMIZER`):

* **val loss** -- final loss on the held-out half of the target; lower is better.
* **tokens-to-target vs random** -- how much sooner (in training tokens) the run reaches the
  final validation loss of `random+lordo`; higher is better, 1.00x is random itself, "not
  reached" means the run never got down to that loss within its steps.
* **bytes sent / rank** -- what each rank's optimizer sent over the network; lower is better.
* **optimizer state / rank** -- the optimizer's memory per rank; lower is better.
* **train s**, **selection s** -- wall time of the training run and of scoring + selecting
  (shared by the runs on the same selection).
* **corrupted-doc AUROC** -- how well the selector's scores rank the clean documents above
  the corrupted ones (0.5 = chance, 1 = perfect; embedded corpus only).
* **corrupted kept** -- the share of corrupted documents in the selection (the pool is
  about half corrupted; lower is better). The kept documents are in
  `select/METHOD/selected.jsonl`, each with its `corrupted` flag and corruption `kind`.
"""


def plot_curves(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r.curve:
            t, l = zip(*r.curve)
            ax.plot(t, l, marker="o", ms=3, label=r.name)
    ax.set_xlabel("training tokens (all ranks)")
    ax.set_ylabel("validation loss (held-out target)")
    ax.set_title("thresher demo: validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pipeline(config, mode, out: Path, clock: _Clock, settings: dict) -> dict:
    from thresher.data.runs import record_run

    clock.begin("data")
    print("[1/5] data: building the pool and the target split", flush=True)
    d = stage_data(config, mode, out)
    record_run(out, settings)  # the inputs were good: from here on the folder holds this run
    print(f"      pool {d['sizes']['pool_docs']} docs ({len(d['pool_samples'])} samples of "
          f"{mode['seq_len']} tokens), target {d['sizes']['target_docs']} docs for the "
          f"selectors, {d['sizes']['val_docs']} held out for validation; vocab "
          f"{d['tok'].vocab_size}", flush=True)

    clock.begin("select")
    print(f"[2/5] select: BLISS, loss filtering and random keep {config.fraction:.0%} of the pool", flush=True)
    selection = stage_select(config, mode, out, d)

    clock.begin("train")
    print(f"[3/5] train: a fresh GPT per selection, LoRDO on {config.nproc} gloo ranks "
          f"(+ DDPAdamW on the BLISS selection)", flush=True)
    runs = [_train(config, mode, out, d, f"{m}+lordo", selection[m]["path"], "lordo")
            for m in ("random", "loss", "bliss")]
    runs.append(_train(config, mode, out, d, "bliss+ddp", selection["bliss"]["path"], "ddp"))
    for r in runs:
        r.selection = r.name.split("+")[0]

    clock.begin("online")
    print("[4/5] online: BLADE selects inside the training loop over the whole pool", flush=True)
    runs.append(_train(config, mode, out, d, "blade+lordo", d["pool_path"], "lordo",
                       {"select": "blade", "select_opt": dict(mode["blade"])}))

    clock.begin("report")
    plot_curves(runs, out / "curves.png")
    clock.end()
    stage_s = clock.totals()
    rows, table = build_table(runs, selection, stage_s)
    resumed = ""
    if clock.parts > 1:
        resumed = (f"**Resumed run**: it ran in {clock.parts} parts (`--resume`); the finished stages "
                   "were reused, and every wall time above adds up all the parts.\n\n")
    report = ("# thresher demo\n\n"
              f"mode: {'quick' if config.quick else 'default'}; pool {config.pool}, target "
              f"{config.target}; keep {config.fraction:.0%}; {config.nproc} ranks; seed {config.seed} (one seed, "
              "one run each)\n\n" + table +
              "\n" + resumed + COLUMNS + "\n![validation loss](curves.png)\n")
    (out / "report.md").write_text(report)
    result = {"rows": rows, "stages_s": stage_s, "stages_this_run_s": clock.this_run,
              "parts": clock.parts, "sizes": d["sizes"]}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    print("[5/5] report\n")
    print(table)
    if resumed:
        print(resumed.replace("**", ""), end="")
    print(f"wrote {out / 'report.md'} and {out / 'curves.png'}; {out} holds "
          f"{_folder_size(out) / 2**20:.0f} MB (checkpoints, tokenised data, selections: delete it "
          "when done)")
    return result


