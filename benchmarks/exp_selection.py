"""Data-selection experiment: every method selects 20% of a mixed pool, a fresh small GPT
trains on each selection with the same token budget and seed, and we compare validation
loss on held-out target-distribution text.

Pool (documents): the embedded corpus (Python docs/docstrings/source, half of it corrupted)
+ WikiText-2 *test* articles + Tiny Shakespeare passages + corrupted copies of some of those
(the embedded corpus's corruption kinds). Target: WikiText-2 *valid* articles, split by
article into the half the scorers see (``target``) and the half the trained models are
evaluated on (``eval``) -- a scorer never sees the evaluation text. Paths are arguments;
without the WikiText/Shakespeare files the experiment runs on the embedded corpus alone
(its own held-out target split).

Reported per method and seed: validation-loss curve, final validation loss,
tokens-to-target speedup (tokens random selection needs to reach its final validation loss
/ tokens the method needs to reach that loss; "<1" when it never does), selection wall time
(fit + score), document-level AUROC of the scores separating corrupted documents, and the
scoring throughput of BLISS's score model vs computing a proxy's per-sample loss.

    python benchmarks/exp_selection.py                 # default: 2 seeds, a few minutes
    python benchmarks/exp_selection.py --quick         # smoke run, 1 seed, ~1 minute
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import collect_metadata, markdown_table, write_results  # noqa: E402

from thresher.data import Document, embedded_corpus, load_tokenizer, pack, read_documents  # noqa: E402
from thresher.data.embedded import CORRUPTION_KINDS, corrupt  # noqa: E402
from thresher.models.gpt import GPT, GPTConfig  # noqa: E402
from thresher.selection.base import build_scorer, per_sample_losses  # noqa: E402
from thresher.selection.metrics import auroc, tokens_to_reach, tokens_to_target_speedup  # noqa: E402
from thresher.selection.strategies import select_topk  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("random", "loss", "excess", "color", "miniplm", "qurating", "bliss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wikitext", default=str(SHARED / "wikitext-2"),
                   help="folder with WikiText-2 test.txt (pool) and valid.txt (target); "
                        "missing = skip (default: %(default)s)")
    p.add_argument("--shakespeare", default=str(SHARED / "tinyshakespeare" / "input.txt"),
                   help="Tiny Shakespeare text file; missing = skip (default: %(default)s)")
    p.add_argument("--target", default=None,
                   help="target/validation corpus (any thresher.data format; default: "
                        "WIKITEXT/valid.txt, else the embedded corpus's target split)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--embedded-docs", type=int, default=300, help="embedded pool documents")
    p.add_argument("--wiki-docs", type=int, default=10, help="WikiText-2 test articles in the pool")
    p.add_argument("--shakespeare-docs", type=int, default=120, help="Shakespeare passages in the pool")
    p.add_argument("--corrupt-copies", type=float, default=0.3,
                   help="fraction of the wiki/Shakespeare docs also added as corrupted copies")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=150, help="steps of each fresh model")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--scorer-steps", type=int, default=150,
                   help="training steps of each baseline's models (BLISS's cost is set by "
                        "--bliss-outer; both are reported as wall time)")
    p.add_argument("--bliss-warmup", type=int, default=80)
    p.add_argument("--bliss-outer", type=int, default=25)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, loaded machine more threads "
                        "spin in OpenMP barriers and run slower)")
    p.add_argument("--quick", action="store_true", help="small pool, short runs, one seed")
    p.add_argument("--out", default="bench-results", help="folder for CSV/JSON/PNG")
    p.add_argument("--name", default=None, help="output file stem (default exp_selection[-quick])")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only combine the JSON results of earlier runs into one table/CSV/plot")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds = a.seeds if "--seeds" in (argv or sys.argv) else "0"
        a.embedded_docs, a.wiki_docs, a.shakespeare_docs = 100, 3, 30
        a.train_steps, a.eval_every, a.eval_samples = 40, 10, 64
        a.scorer_steps, a.bliss_warmup, a.bliss_outer = 40, 20, 5
    if not 0 < a.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {a.fraction}")
    return a


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def _take(docs, n, rng):
    docs = list(docs)
    if n >= len(docs):
        return docs
    return [docs[i] for i in np.sort(rng.choice(len(docs), n, replace=False))]


def build_data(a):
    rng = np.random.default_rng(1234)
    corpus = embedded_corpus(seed=0, size=max(10, a.embedded_docs))
    texts = [(d.text, "embedded-" + (k or "clean"), bool(lab))
             for d, lab, k in zip(corpus.pool, corpus.labels, corpus.kinds)]
    extra = []
    wiki = Path(a.wikitext)
    if (wiki / "test.txt").is_file():
        extra += [(d.text, "wiki") for d in _take(read_documents(wiki / "test.txt", split="wikitext"),
                                                   a.wiki_docs, rng)]
    if Path(a.shakespeare).is_file():
        extra += [(d.text, "shakespeare") for d in _take(read_documents(a.shakespeare),
                                                          a.shakespeare_docs, rng)]
    texts += [(t, src, False) for t, src in extra]
    for t, src in _take(extra, int(round(a.corrupt_copies * len(extra))), rng):
        kind = CORRUPTION_KINDS[int(rng.integers(len(CORRUPTION_KINDS)))]
        texts.append((corrupt(t, kind, rng), f"{src}-{kind}", True))
    target_path = a.target or (str(wiki / "valid.txt") if (wiki / "valid.txt").is_file() else None)
    target_docs = ([d.text for d in read_documents(target_path)] if target_path
                   else [d.text for d in corpus.target])
    # target documents alternate between the scorers' target set and the evaluation set
    sel_target, eval_target = target_docs[0::2], target_docs[1::2]
    pool_docs = [Document(i, t, {"source": s}) for i, (t, s, _) in enumerate(texts)]
    tok = load_tokenizer(None, train_docs=[d.text for d in pool_docs], vocab_size=a.vocab,
                         cache_dir=Path(a.out) / "exp_selection_tokenizer")
    pool = pack(pool_docs, tok, a.seq_len)
    target = pack(sel_target, tok, a.seq_len)
    ev = pack(eval_target, tok, a.seq_len)
    ev = ev[np.sort(np.random.default_rng(0).permutation(len(ev))[:a.eval_samples])]
    info = {
        "pool_docs": len(pool_docs), "pool_samples": len(pool), "pool_tokens": int(pool.lengths.sum()),
        "target_samples": len(target), "eval_samples": len(ev), "vocab": tok.vocab_size,
        "target_path": target_path or "embedded target split",
        "docs_by_source": {s: int(sum(1 for _, src, _ in texts if src == s))
                           for s in sorted({t[1] for t in texts})},
    }
    src = np.array([s for _, s, _ in texts])[pool.doc_index]
    info["sample_share"] = {k: round(float(np.mean([x.startswith(k) for x in src])), 3)
                            for k in ("embedded", "wiki", "shakespeare")}
    info["sample_share"]["corrupted"] = round(float(np.mean(
        np.array([c for _, _, c in texts])[pool.doc_index])), 3)
    return dict(pool=pool, target=target, eval=ev, tok=tok,
                labels=np.array([c for _, _, c in texts]),
                source=np.array([s for _, s, _ in texts]), info=info)


# ----------------------------------------------------------------------------------------
# Methods, training, metrics
# ----------------------------------------------------------------------------------------

MODEL = dict(d_model=64, n_layers=2, n_heads=2)
TEACHER = dict(d_model=128, n_layers=3, n_heads=4)


def scorer_options(method, a):
    s = a.scorer_steps
    common = dict(model=MODEL, steps=s, batch_size=16, lr=2e-3)
    return {
        "random": {},
        "loss": common,
        "excess": common,
        "color": {**common, "finetune_steps": s // 2},
        "miniplm": {**common, "teacher": TEACHER},
        "qurating": {"base": "loss", "temperature": 1.0, "base_options": common},
        "bliss": dict(model=MODEL, warmup_steps=a.bliss_warmup, outer_steps=a.bliss_outer,
                      warmup_lr=2e-3),
    }[method]


def train_and_eval(samples, ev, a, seed, vocab):
    """Fresh GPT (same seed for every method), ``train_steps`` AdamW steps on batches drawn
    uniformly from ``samples``; validation loss every ``eval_every`` steps.
    Returns [(tokens_seen, val_loss)]."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, max_seq_len=a.seq_len, **MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    curve = [(0, float(per_sample_losses(model, ev, batch_size=128).mean()))]
    for step in range(1, a.train_steps + 1):
        model.train()
        idx = torch.randint(0, len(samples), (a.train_batch,), generator=g)
        loss = model.loss(samples.input_ids[idx], samples.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.train_steps:
            curve.append((step * a.train_batch * a.seq_len,
                          float(per_sample_losses(model, ev, batch_size=128).mean())))
    return curve


def throughput(scorer, proxy, pool, repeats=2):
    """samples/s of the BLISS score model vs a proxy LM's per-sample loss on the pool."""
    best = {}
    for name, fn in (("score_model", lambda: scorer.score(pool, batch_size=128)),
                     ("proxy_loss", lambda: per_sample_losses(proxy, pool, batch_size=128))):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        best[name] = len(pool) / min(ts)
    return best


def main(argv=None):
    a = parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out, a.name or "exp_selection")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = build_data(a)
    pool, target, ev, vocab = data["pool"], data["target"], data["eval"], data["tok"].vocab_size
    print(f"data: {json.dumps(data['info'])} ({time.time() - t0:.1f}s)", flush=True)
    methods = [m for m in a.methods.split(",") if m]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    rows, curves, thr = [], {}, None
    for seed in seeds:
        for m in methods:
            t = time.perf_counter()
            sc = build_scorer(m, vocab_size=vocab, seed=seed, **scorer_options(m, a))
            sc.fit(pool, target, progress=a.progress)
            scores = sc.score(pool, batch_size=128, progress=a.progress)
            sel_time = time.perf_counter() - t
            idx = select_topk(scores, a.fraction)
            doc = pool.doc_scores(scores, "mean")
            has = ~np.isnan(doc)
            au = auroc(doc[has], ~data["labels"][has])  # clean docs should score higher
            share = {s: float(np.mean(data["source"][pool.doc_index[idx]] == s))
                     for s in ("wiki", "shakespeare")}
            share["corrupted"] = float(np.mean(data["labels"][pool.doc_index[idx]]))
            curve = train_and_eval(pool[idx], ev, a, seed, vocab)
            curves[(m, seed)] = curve
            rows.append(dict(method=m, seed=seed, final_val_loss=curve[-1][1],
                             selection_s=sel_time, auroc_corrupted=au,
                             sel_wiki=share["wiki"], sel_shakespeare=share["shakespeare"],
                             sel_corrupted=share["corrupted"], selected=len(idx)))
            print(f"seed {seed} {m:9s} val {curve[-1][1]:.4f} auroc {au:.3f} "
                  f"sel {sel_time:.1f}s wiki {share['wiki']:.2f} corrupted {share['corrupted']:.2f}",
                  flush=True)
            if m == "bliss" and thr is None:
                thr = throughput(sc, sc.proxy, pool)
    meta = collect_metadata(**{"experiment": "selection", "args": vars(a), "data": data["info"],
                               "throughput_samples_per_s": thr,
                               "wall_s": time.time() - t0})
    name = a.name or "exp_selection" + ("-quick" if a.quick else "")
    return report(rows, curves, meta, out, name)


def merge(paths, out, name):
    """Combines the JSON results of runs made separately (e.g. one process per seed)."""
    rows, curves, meta = [], {}, None
    for p in paths:
        d = json.loads(Path(p).read_text())
        rows += d["rows"]
        curves.update({(k.split("/")[0], int(k.split("/")[1])): [tuple(x) for x in c]
                       for k, c in d["curves"].items()})
        meta = meta or d["meta"]
        meta.setdefault("merged_from", []).append(str(p))
        meta.setdefault("wall_s_each", []).append(d["meta"].get("wall_s"))
    return report(rows, curves, meta, Path(out), name)


def report(rows, curves, meta, out, name):
    # tokens-to-target vs random (per seed)
    for r in rows:
        if ("random", r["seed"]) not in curves:
            continue
        rc, mc = curves[("random", r["seed"])], curves[(r["method"], r["seed"])]
        r["tokens_to_random_final"] = tokens_to_reach(mc, rc[-1][1])
        r["speedup_vs_random"] = tokens_to_target_speedup(rc, mc)  # 0: never reaches it
    summary = summarise(rows)
    thr = meta.get("throughput_samples_per_s")
    paths = write_results(out, name, rows, meta, summary=summary,
                          curves={f"{m}/{s}": c for (m, s), c in curves.items()})
    plot(curves, out / f"{name}.png")
    cols = [("method", "method"), ("final_val_loss", "final val loss", ".4f"),
            ("final_val_loss_std", "±", ".4f"), ("speedup_vs_random", "tokens-to-target ×", ".2f"),
            ("auroc_corrupted", "AUROC corrupted", ".3f"), ("selection_s", "selection s", ".1f"),
            ("sel_wiki", "wiki share", ".2f"), ("sel_corrupted", "corrupted share", ".2f")]
    print()
    print(markdown_table(summary, cols))
    if thr:
        print(f"\nscoring throughput on the pool: BLISS score model {thr['score_model']:.0f} "
              f"samples/s, proxy per-sample loss {thr['proxy_loss']:.0f} samples/s "
              f"({thr['score_model'] / thr['proxy_loss']:.2f}x)")
    print(f"\nwrote {paths['csv']}, {paths['json']}, {out / (name + '.png')} "
          f"(experiment wall time {meta.get('wall_s') or 0:.0f}s)")
    return 0


def summarise(rows):
    out = []
    order = {m: i for i, m in enumerate(METHODS)}  # table order, also for merged runs
    for m in sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: order.get(m, len(order))):
        rs = [r for r in rows if r["method"] == m]
        s = {"method": m, "seeds": len(rs)}
        for k in ("final_val_loss", "speedup_vs_random", "auroc_corrupted", "selection_s",
                  "sel_wiki", "sel_corrupted"):
            v = np.array([r.get(k, np.nan) for r in rs], dtype=float)
            s[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            if k == "final_val_loss":
                s["final_val_loss_std"] = float(v.std())
        out.append(s)
    return out


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(m for m, _ in curves))
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for (m, s), c in curves.items():
        t, l = zip(*c[1:])
        ax.plot(np.array(t) / 1e3, l, color=colors[m], alpha=0.9 if s == 0 else 0.5,
                ls="-" if s == 0 else "--", label=m if s == min(x for mm, x in curves if mm == m) else None)
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (held-out target)")
    ax.set_title("fresh GPT trained on each 20% selection")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
