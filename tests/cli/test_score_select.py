"""`thresher score` / `thresher select` end to end through `thresher.cli.main`.

Round trips for every input format: a content-based scorer marks the samples whose bytes
contain "KEEP"; after score -> select the written documents must be exactly the pool's
documents whose text starts with "KEEP", in the pool's format with all its details. Then the
real scorers (random, loss), the embedded pool, resume after an interruption, torchrun-style
sharding, and bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import thresher.selection as selection
from thresher.cli import main
from thresher.data import read_documents

N_DOCS = 13
KEEP = {1, 4, 5, 11}


class MarkerScorer:
    """Score 1 for a sample whose (byte-tokenised) real tokens contain b"KEEP", else 0."""

    calls: list = []
    fail_after: int | None = None

    def __init__(self, **kw):
        self.kw = kw

    def fit(self, pool, target, *, checkpoint_dir=None, resume=False, progress=True):
        assert len(pool) and len(target)
        return self

    def score(self, samples, *, batch_size=64, progress=False):
        if MarkerScorer.fail_after is not None and len(MarkerScorer.calls) >= MarkerScorer.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        MarkerScorer.calls.append(len(samples))
        out = []
        for row, n in zip(samples.input_ids.tolist(), samples.lengths.tolist()):
            out.append(1.0 if b"KEEP" in bytes(t for t in row[:n] if t < 256) else 0.0)
        return np.array(out, np.float32)


@pytest.fixture
def scorers(monkeypatch):
    """thresher.selection.build_scorer (the real one; taken from selection.base while the
    package does not export it yet) plus the 'marker' test method."""
    from thresher.selection import base

    real = getattr(selection, "build_scorer", base.build_scorer)

    def build(method, **kw):
        return MarkerScorer(**kw) if method == "marker" else real(method, **kw)

    monkeypatch.setattr(selection, "build_scorer", build, raising=False)
    methods = base.available_methods()
    monkeypatch.setattr(selection, "available_methods", lambda: [*methods, "marker"])
    MarkerScorer.calls = []
    MarkerScorer.fail_after = None
    return build


def _text(i):
    body = f"document {i} " + "lorem ipsum dolor " * (i % 5 + 1)
    return ("KEEP " if i in KEEP else "drop ") + body


def _make_pool(tmp_path, fmt):
    texts = [_text(i) for i in range(N_DOCS)]
    if fmt == "jsonl":
        p = tmp_path / "pool.jsonl"
        p.write_text("".join(json.dumps({"id": f"d{i}", "body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
        return p, ["--text-field", "body", "--target-text-field", "text"]
    if fmt == "parquet":
        p = tmp_path / "pool.parquet"
        pq.write_table(pa.table({"text": texts, "n": pa.array(range(N_DOCS), pa.int8())}), p, row_group_size=4)
        return p, []
    if fmt == "folder":
        p = tmp_path / "pool"
        for i, t in enumerate(texts):
            (p / f"g{i % 3}").mkdir(parents=True, exist_ok=True)
            (p / f"g{i % 3}" / f"doc{i:02d}.txt").write_text(t + "\n")
        return p, []
    if fmt == "wikitext":
        p = tmp_path / "wiki.txt"
        p.write_text(" \n" + "".join(f" = {t[:4]} Title {i} = \n \n {t} \n \n = = Part = = \n more . \n"
                                     for i, t in enumerate(texts)))
        return p, []
    if fmt == "paragraphs":
        p = tmp_path / "plays.txt"
        p.write_text("\n\n".join(f"{t}\nsecond line of {i}" for i, t in enumerate(texts)) + "\n")
        return p, ["--split", "paragraph:0"]
    if fmt == "hf":
        datasets = pytest.importorskip("datasets", reason="HF datasets (optional dependency) is not installed")
        p = tmp_path / "hf"
        datasets.Dataset.from_dict({"text": texts, "n": list(range(N_DOCS))}).save_to_disk(str(p))
        return p, []
    raise AssertionError(fmt)


def _target(tmp_path):
    p = tmp_path / "target.jsonl"
    p.write_text("".join(json.dumps({"text": f"target text {i} lorem"}) + "\n" for i in range(3)))
    return p


def _score(tmp_path, pool, extra, out="run", method="marker", seq_len=16, more=()):
    argv = ["score", "--method", method, "--pool", str(pool), "--target", str(_target(tmp_path)),
            "--out", str(tmp_path / out), "--tokenizer", "byte", "--seq-len", str(seq_len),
            "--no-progress", *extra, *more]
    return main(argv)


OUT_NAME = {"jsonl": "sel.jsonl", "parquet": "sel.parquet", "folder": "sel", "wikitext": "sel.txt",
            "paragraphs": "sel.txt", "hf": "sel"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "folder", "wikitext", "paragraphs", "hf"])
def test_round_trip_every_format(tmp_path, scorers, fmt):
    pool, extra = _make_pool(tmp_path, fmt)
    assert _score(tmp_path, pool, extra) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["counts"]["pool_docs"] == N_DOCS and manifest["seq_len"] == 16
    assert manifest["pool"]["format"] == ("txt" if fmt in ("wikitext", "paragraphs") else fmt)
    scores = np.load(run / "scores.npy")
    doc_index = np.load(run / "pool_samples" / "doc_index.npy")
    assert scores.dtype == np.float32 and scores.shape == doc_index.shape
    assert len(np.unique(doc_index)) == N_DOCS  # samples of every document, each mapped to one

    out = tmp_path / OUT_NAME[fmt]
    args = ["select", "--scores", str(run), "--strategy", "threshold", "--threshold", "0.5",
            "--reduce", "max", "--out", str(out), "--ids-out", str(tmp_path / "ids.npy")]
    assert main(args) == 0
    text_field = "body" if fmt == "jsonl" else "text"
    split = "paragraph:0" if fmt == "paragraphs" else "auto"
    src = list(read_documents(pool, text_field, split=split))
    want = [d for d in src if "KEEP" in d.text]  # ids are read-order positions (folder: sorted paths)
    assert len(want) == len(KEEP)
    assert np.load(tmp_path / "ids.npy").tolist() == [d.id for d in want]
    got = list(read_documents(out, text_field, split=split))
    assert [d.text for d in got] == [d.text for d in want]
    assert all(d.text.lstrip(" =").startswith("KEEP") for d in got)
    assert [d.meta for d in got] == [d.meta for d in want]
    if fmt == "parquet":
        assert pq.read_table(out).schema == pq.read_table(pool).schema
    if fmt == "folder":
        for d in want:
            assert (out / d.meta["path"]).read_bytes() == (pool / d.meta["path"]).read_bytes()
    # top-k over the same scores selects the same documents
    out2 = tmp_path / ("k-" + OUT_NAME[fmt])
    assert main(["select", "--scores", str(run), "--fraction", str(len(KEEP) / N_DOCS), "--reduce", "max",
                 "--out", str(out2)]) == 0
    assert [d.text for d in read_documents(out2, text_field, split=split)] == [d.text for d in want]


def test_real_random_and_loss_scorers(tmp_path, scorers):
    pool, extra = _make_pool(tmp_path, "jsonl")
    assert _score(tmp_path, pool, extra, out="rand", method="random") == 0
    s1 = np.load(tmp_path / "rand" / "scores.npy")
    assert s1.dtype == np.float32 and np.isfinite(s1).all()
    assert main(["select", "--scores", str(tmp_path / "rand"), "--fraction", "0.3", "--strategy", "gumbel",
                 "--temperature", "0.5", "--out", str(tmp_path / "r.jsonl")]) == 0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4  # round(0.3 * 13)
    assert _score(tmp_path, pool, extra, out="loss", method="loss", seq_len=64,
                  more=["--steps", "1", "--batch-size", "4", "--model", "tiny"]) == 0
    s2 = np.load(tmp_path / "loss" / "scores.npy")
    assert np.isfinite(s2).all() and (s2 < 0).all()  # minus a token-mean loss
    assert (tmp_path / "loss" / "ckpt").is_dir()
    assert main(["select", "--scores", str(tmp_path / "loss"), "--fraction", "0.5",
                 "--out", str(tmp_path / "l.parquet")]) == 0  # jsonl pool -> parquet out
    assert pq.read_table(tmp_path / "l.parquet").num_rows == 7


def test_embedded_pool(tmp_path, scorers, capsys):
    argv = ["score", "--method", "random", "--pool", "embedded", "--target", "embedded", "--embedded-size", "60",
            "--out", str(tmp_path / "emb"), "--tokenizer", "bpe", "--vocab-size", "300", "--seq-len", "32",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    m = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert m["pool"]["format"] == "embedded" and m["counts"]["pool_docs"] == 60 and m["counts"]["target_docs"] == 12
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 300
    assert main(["select", "--scores", str(tmp_path / "emb"), "--fraction", "0.2", "--out",
                 str(tmp_path / "e.jsonl")]) == 0
    assert "corrupted documents:" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"text", "source", "unit", "kind", "corrupted"}


def test_resume_keeps_finished_shards(tmp_path, scorers, capsys):
    pool, extra = _make_pool(tmp_path, "jsonl")
    ref_dir = tmp_path / "ref"
    assert _score(tmp_path, pool, extra, out="ref", more=["--shard-size", "4"]) == 0
    reference = np.load(ref_dir / "scores.npy")
    n_shards = len(MarkerScorer.calls)
    assert n_shards >= 3
    MarkerScorer.calls, MarkerScorer.fail_after = [], 2
    assert _score(tmp_path, pool, extra, out="run", more=["--shard-size", "4"]) == 130  # Ctrl-C
    assert "interrupted; rerun with --resume" in capsys.readouterr().err
    assert not (tmp_path / "run" / "scores.npy").exists()
    assert len(list((tmp_path / "run" / "shards").glob("*.npy"))) == 2
    # without --resume: refused; with other settings: refused
    assert _score(tmp_path, pool, extra, out="run", more=["--shard-size", "4"]) == 2
    assert _score(tmp_path, pool, extra, out="run", seq_len=32, more=["--shard-size", "4", "--resume"]) == 2
    MarkerScorer.calls, MarkerScorer.fail_after = [], None
    assert _score(tmp_path, pool, extra, out="run", more=["--shard-size", "4", "--resume"]) == 0
    assert len(MarkerScorer.calls) == n_shards - 2  # only the missing shards were scored
    assert np.array_equal(np.load(tmp_path / "run" / "scores.npy"), reference)


def test_ranks_score_their_shards_and_select_merges(tmp_path, scorers, monkeypatch, capsys):
    pool, extra = _make_pool(tmp_path, "jsonl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shard = 20
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert _score(tmp_path, pool, extra, more=["--shard-size", str(shard)]) == 0
        n = len(np.load(tmp_path / "run" / "pool_samples" / "doc_index.npy"))
        n_shards = -(-n // shard)
        assert n_shards >= 3
        if rank == "1":  # rank 0's shards are missing: no merged output yet
            assert not (tmp_path / "run" / "manifest.json").exists()
            assert f"waiting for shards {list(range(0, n_shards, 2))}" in capsys.readouterr().err
            assert len(MarkerScorer.calls) == len(range(1, n_shards, 2))
    sizes = [min(shard, n - k * shard) for k in range(n_shards)]
    assert MarkerScorer.calls == sizes[1::2] + sizes[0::2]  # each rank its own shards, once
    merged = np.load(tmp_path / "run" / "scores.npy")
    for f in ("manifest.json", "scores.npy", "doc_scores.npy"):
        (tmp_path / "run" / f).unlink()
    assert main(["select", "--scores", str(tmp_path / "run"), "--fraction", "0.3", "--out",
                 str(tmp_path / "s.jsonl")]) == 0  # select merges the shards itself
    assert np.array_equal(np.load(tmp_path / "run" / "scores.npy"), merged)


def test_bad_inputs(tmp_path, scorers, capsys):
    pool, extra = _make_pool(tmp_path, "jsonl")

    def fails(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err, err

    target = str(_target(tmp_path))
    base = ["score", "--method", "marker", "--tokenizer", "byte", "--no-progress", "--target", target]
    fails(base + ["--pool", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "a")], "--pool: no such file")
    fails(base + ["--pool", str(pool), "--out", str(tmp_path / "b")], "no field 'text'")
    (tmp_path / "empty.jsonl").write_text("")
    fails(base + ["--pool", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "c")], "holds no documents")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    fails(base + ["--pool", str(tmp_path / "blank.jsonl"), "--out", str(tmp_path / "c")], "every document is empty")
    fails(base + ["--pool", str(pool), *extra, "--tokenizer", "nope/tok.json",
                  "--out", str(tmp_path / "d")], "--tokenizer")
    fails(["score", "--method", "nomethod", "--tokenizer", "byte", "--no-progress", "--pool", str(pool),
           *extra, "--target", target, "--out", str(tmp_path / "e")], "method must be one of")
    assert not (tmp_path / "b").exists() or not (tmp_path / "b" / "run.json").exists()
    assert _score(tmp_path, pool, extra) == 0
    run = str(tmp_path / "run")
    for frac in ("0", "1.5", "-0.2"):
        fails(["select", "--scores", run, "--fraction", frac, "--out", str(tmp_path / "x.jsonl")],
              "--fraction must be in (0, 1]")
    fails(["select", "--scores", run, "--out", str(tmp_path / "x.jsonl")], "needs --fraction")
    fails(["select", "--scores", run, "--strategy", "threshold", "--out", str(tmp_path / "x.jsonl")],
          "needs --threshold")
    fails(["select", "--scores", str(tmp_path / "nope"), "--fraction", "0.5", "--out", str(tmp_path / "x.jsonl")],
          "--scores: no such folder")
    fails(["select", "--scores", run, "--fraction", "0.5", "--out", str(tmp_path / "x.csv")], "unknown file type")
    pool.write_text(pool.read_text() + json.dumps({"body": "one more"}) + "\n")
    fails(["select", "--scores", run, "--fraction", "0.5", "--out", str(tmp_path / "x.jsonl")], "pool changed")
    assert not (tmp_path / "x.jsonl").exists()


def test_failed_inputs_leave_out_reusable(tmp_path, scorers, capsys):
    pool, extra = _make_pool(tmp_path, "jsonl")
    bad_target = tmp_path / "t.jsonl"
    bad_target.write_text(json.dumps({"body": "x"}) + "\n")  # wrong field for the target
    argv = ["score", "--method", "marker", "--tokenizer", "byte", "--no-progress", "--pool", str(pool),
            "--text-field", "body", "--target", str(bad_target), "--target-text-field", "text",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2 and "no field 'text'" in capsys.readouterr().err
    assert not list((tmp_path / "run").iterdir())  # the pool's samples were removed again
    bad_target.write_text(json.dumps({"text": "x y z"}) + "\n")
    assert main(argv) == 0  # same --out, no --resume needed


# ----------------------------------------------------------------------------------------
# select never destroys or silently reuses data (issue 14 items 1, 3, 4, 5)


def _scored(tmp_path, fmt="jsonl"):
    pool, extra = _make_pool(tmp_path, fmt)
    assert _score(tmp_path, pool, extra) == 0
    return pool, str(tmp_path / "run")


def _select(run, out, *more):
    return main(["select", "--scores", run, "--fraction", "0.5", "--out", str(out), *more])


def test_select_refuses_to_write_over_its_inputs(tmp_path, scorers, capsys):
    pool, run = _scored(tmp_path)
    before = pool.read_bytes()
    for out in (pool, tmp_path / "run" / "manifest.json", tmp_path / "run"):
        assert _select(run, out, "--overwrite") == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert _select(run, tmp_path / "sel.jsonl", "--ids-out", str(pool), "--overwrite") == 2
    assert "--ids-out" in capsys.readouterr().err
    assert pool.read_bytes() == before and not (tmp_path / "sel.jsonl").exists()
    assert _select(run, tmp_path / "run" / "sel.jsonl") == 0  # a new file beside the scores is fine


def test_select_refuses_an_existing_output_unless_overwrite(tmp_path, scorers, capsys):
    _, run = _scored(tmp_path)
    out, ids = tmp_path / "mine.jsonl", tmp_path / "mine.npy"
    out.write_text("my own file\n")
    assert _select(run, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "my own file\n"
    ids.write_bytes(b"mine")
    assert _select(run, tmp_path / "new.jsonl", "--ids-out", str(ids)) == 2
    assert ids.read_bytes() == b"mine" and not (tmp_path / "new.jsonl").exists()  # nothing written
    assert _select(run, out, "--ids-out", str(ids), "--overwrite") == 0
    assert len(out.read_text().splitlines()) == 7 and len(np.load(ids)) == 7
    # a folder output: an existing non-empty folder likewise
    folder = tmp_path / "selfolder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert _select(run, folder) == 2 and (folder / "keep.txt").read_text() == "mine"
    assert _select(run, folder, "--overwrite") == 0
    assert not (folder / "keep.txt").exists() and len(list(folder.iterdir())) == 7


def test_failed_pool_check_keeps_the_existing_output(tmp_path, scorers, capsys):
    pool, run = _scored(tmp_path)
    out = tmp_path / "sel.jsonl"
    assert _select(run, out) == 0
    before = out.read_bytes()
    # a manifest from before fingerprints: only the count check, which runs while reading
    m = tmp_path / "run" / "manifest.json"
    manifest = json.loads(m.read_text())
    del manifest["pool"]["fingerprint"]
    m.write_text(json.dumps(manifest))
    pool.write_text(pool.read_text() + json.dumps({"body": "one more"}) + "\n")
    assert _select(run, out, "--overwrite") == 2
    assert "pool changed" in capsys.readouterr().err
    assert out.read_bytes() == before  # not deleted, not replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sel.jsonl.")]  # no temp file left


def test_pool_with_the_same_count_but_other_documents_is_refused(tmp_path, scorers, capsys):
    pool, run = _scored(tmp_path)
    lines = pool.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # same documents, same count, other order
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(lines) + "\n")
    assert _select(run, tmp_path / "sel.jsonl", "--pool", str(other)) == 2
    assert "pool changed since scoring" in capsys.readouterr().err
    assert not (tmp_path / "sel.jsonl").exists()
    same = tmp_path / "moved.jsonl"
    same.write_bytes(pool.read_bytes())
    assert _select(run, tmp_path / "sel.jsonl", "--pool", str(same)) == 0  # a moved pool is fine


def test_select_txt_from_a_jsonl_pool(tmp_path, scorers):
    _, run = _scored(tmp_path)
    assert _select(run, tmp_path / "sel.txt") == 0
    docs = list(read_documents(tmp_path / "sel.txt", split="paragraph:0"))
    assert len(docs) == 7 and all(d.text.startswith(("KEEP", "drop")) for d in docs)


def test_outputs_honour_the_umask(tmp_path, scorers):
    import os

    _, run = _scored(tmp_path)
    old = os.umask(0o022)
    try:
        assert _select(run, tmp_path / "sel.jsonl", "--ids-out", str(tmp_path / "ids.npy")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "sel.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ids.npy").stat().st_mode & 0o777 == 0o644


def test_threshold_keeping_nothing_is_an_error(tmp_path, scorers, capsys):
    _, run = _scored(tmp_path)
    out = tmp_path / "none.jsonl"
    assert main(["select", "--scores", run, "--strategy", "threshold", "--threshold", "5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "keeps none of the 13 documents" in err and "document scores range from 0 to" in err
    assert not out.exists()


def test_file_system_errors_are_one_line(tmp_path, scorers, capsys, monkeypatch):
    _, run = _scored(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert _select(run, tmp_path / "afile" / "sel.jsonl") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "adir.jsonl").mkdir()
    assert _select(run, tmp_path / "adir.jsonl", "--overwrite") == 2
    assert "is an existing folder, not a file" in capsys.readouterr().err
    # any OSError while writing (read-only disk, quota...) is one line naming the file
    import thresher.data.documents as documents

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "sel.jsonl"))

    monkeypatch.setattr(documents, "_write_jsonl", denied)
    assert _select(run, tmp_path / "ro" / "sel.jsonl") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"thresher select: error: Permission denied: "
                                        f"{str(tmp_path / 'ro' / 'sel.jsonl')!r}"]


def test_score_checks_the_device_and_method_before_writing(tmp_path, scorers, capsys):
    import torch

    pool, extra = _make_pool(tmp_path, "jsonl")
    if not torch.cuda.is_available():
        assert _score(tmp_path, pool, extra, out="cuda", more=["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert _score(tmp_path, pool, extra, out="bad", method="loss", more=["--opt", "nonsense=1"]) == 2
    assert "--method loss rejects its options" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert _score(tmp_path, pool, extra, out="bad", method="random") == 0  # the corrected rerun


def test_jsonl_utf8_error_names_file_and_line(tmp_path, scorers, capsys):
    pool = tmp_path / "bad.jsonl"
    pool.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert _score(tmp_path, pool, [], out="u") == 2
    assert f"{pool}:2: not valid UTF-8" in capsys.readouterr().err


def test_messages_name_the_flag_not_the_tokenizer(tmp_path, scorers, capsys):
    pool, _ = _make_pool(tmp_path, "jsonl")  # its text field is "body"
    bpe = ["--tokenizer", "bpe", "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")]
    assert _score(tmp_path, pool, [], out="a", more=bpe) == 2
    err = capsys.readouterr().err
    assert "no field 'text'" in err and "error: --tokenizer" not in err, err
    (tmp_path / "empty.jsonl").write_text("")
    assert _score(tmp_path, tmp_path / "empty.jsonl", [], out="b", more=bpe) == 2
    err = capsys.readouterr().err
    assert "holds no documents" in err and "cannot train" not in err, err
    with pytest.raises(SystemExit):
        main(["score", "--method", "random", "--pool", "embedded", "--target", "embedded",
              "--embedded-size", "tiny", "--out", str(tmp_path / "d")])
    assert "argument --embedded-size: expected quick or default" in capsys.readouterr().err


def test_resumed_bliss_says_where_it_resumes(tmp_path, scorers, capsys):
    import shutil

    pool, extra = _make_pool(tmp_path, "jsonl")
    opts = ["--opt", "warmup_steps=2", "--opt", "outer_steps=2", "--opt", "inner_steps=1",
            "--opt", 'model={"d_model": 16, "n_layers": 1, "n_heads": 2}']
    assert _score(tmp_path, pool, extra, out="b", method="bliss", more=opts) == 0
    assert "resuming" not in capsys.readouterr().err
    shutil.rmtree(tmp_path / "b" / "shards")
    (tmp_path / "b" / "manifest.json").unlink()
    assert _score(tmp_path, pool, extra, out="b", method="bliss", more=[*opts, "--resume"]) == 0
    assert "bliss: resuming from outer step 2 of 2" in capsys.readouterr().err
