"""Readers/writers: every format round-trips (read -> write -> read gives the same documents),
text-file split rules, streaming of parquet row groups, clear errors for bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thresher.data import (
    Document,
    count_documents,
    detect_format,
    read_documents,
    resolve_split,
    write_documents,
    write_selected,
)

TEXTS = [
    "The first document.\nIt has two lines.",
    "Ünïcödé text — with ✓ symbols and\ttabs",
    "",  # empty text is a document too
    "A third one with \"quotes\" and \\ backslashes.",
]


def _same(a, b, meta=True):
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.id for d in b] == list(range(len(b)))
    if meta:
        assert [d.meta for d in a] == [d.meta for d in b]


def _write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_jsonl_round_trip_keeps_fields(tmp_path):
    src = tmp_path / "pool.jsonl"
    recs = [{"id": i, "content": t, "url": f"u{i}", "score": i / 3, "tags": ["a", i]} for i, t in enumerate(TEXTS)]
    _write_jsonl(src, recs)
    with open(src, "a") as f:
        f.write("\n")  # blank lines are skipped
    docs = list(read_documents(src, text_field="content"))
    assert [d.text for d in docs] == TEXTS
    assert docs[1].meta == {"id": 1, "url": "u1", "score": 1 / 3, "tags": ["a", 1]}
    out = tmp_path / "out.jsonl"
    assert write_documents(docs, out, like=src, text_field="content") == len(TEXTS)
    _same(docs, list(read_documents(out, "content")))
    back = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert back == recs  # every original field, values exact


def test_parquet_round_trip_keeps_schema_and_streams_row_groups(tmp_path):
    src = tmp_path / "pool.parquet"
    n = 50
    table = pa.table({
        "text": [f"document number {i} " * (i % 4 + 1) for i in range(n)],
        "n": pa.array(range(n), type=pa.int16()),
        "w": pa.array(np.linspace(0, 1, n), type=pa.float32()),
    })
    pq.write_table(table, src, row_group_size=7)  # 8 row groups
    assert pq.ParquetFile(src).num_row_groups == 8
    docs = list(read_documents(src))
    assert [d.text for d in docs] == table.column("text").to_pylist()
    assert docs[3].meta["n"] == 3
    out = tmp_path / "sel.parquet"
    write_documents([d for d in docs if d.id % 3 == 0], out, like=src)
    got = pq.read_table(out)
    assert got.schema == table.schema  # int16 / float32 kept
    assert got.to_pylist() == table.take(list(range(0, n, 3))).to_pylist()


def test_text_folder_round_trip_copies_files(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_bytes("second\r\nwith CRLF\n".encode())
    (src / "a.md").write_text("first", encoding="utf-8")
    (src / "sub" / "c.txt").write_bytes(b"bad utf-8 \xff byte")
    (src / ".hidden.txt").write_text("skip me")
    (src / "image.png").write_bytes(b"\x89PNG")
    docs = list(read_documents(src))
    assert detect_format(src) == "folder"
    assert [d.meta["path"] for d in docs] == ["a.md", "b.txt", "sub/c.txt"]
    assert docs[1].text == "second\r\nwith CRLF\n"
    out = tmp_path / "out"
    write_documents([docs[1], docs[2]], out, like=src)
    assert (out / "b.txt").read_bytes() == (src / "b.txt").read_bytes()
    assert (out / "sub" / "c.txt").read_bytes() == b"bad utf-8 \xff byte"  # copied, not re-encoded
    assert not (out / "a.md").exists()
    with pytest.raises(ValueError, match="not an empty folder"):
        write_documents(docs, out, like=src)


WIKI = """ 
 = Alpha = 
 
 Alpha is the first article . 
 
 = = History = = 
 
 Some history with 1 @,@ 000 numbers . 
 
 = Beta = 
 
 Beta article text . 
 = = = Deep = = = 
 more . 
 
 = Gamma = 
 Gamma only . 
"""


def test_wikitext_split(tmp_path):
    src = tmp_path / "wiki.txt"
    src.write_text(WIKI, encoding="utf-8")
    assert resolve_split(src) == "wikitext"
    docs = list(read_documents(src))
    assert [d.text.split("\n")[0] for d in docs] == [" = Alpha = ", " = Beta = ", " = Gamma = "]
    assert "= = History = =" in docs[0].text and "= = = Deep = = =" in docs[1].text
    # the file is exactly the (non-blank) preamble-free concatenation of the documents
    assert "\n".join(d.text for d in docs) + "\n" == WIKI[WIKI.index(" = Alpha"):]
    out = tmp_path / "sel.txt"
    write_documents([docs[0], docs[2]], out, like=src)
    _same([docs[0], docs[2]], list(read_documents(out)), meta=False)


def _blocks(text):
    out, cur = [], []
    for line in text.split("\n") + [""]:
        if line.strip():
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    return out


def test_paragraph_split_merges_to_min_chars_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    blocks = ["\n".join("w" * int(rng.integers(1, 40)) for _ in range(int(rng.integers(1, 4)))) for _ in range(60)]
    seps = ["\n\n", "\n\n\n", "\n  \n"]
    text = "\n\n" + "".join(b + seps[i % 3] for i, b in enumerate(blocks))
    src = tmp_path / "plays.txt"
    src.write_text(text, encoding="utf-8")
    assert resolve_split(src) == "paragraph:1000"
    for split, min_chars in (("paragraph:100", 100), ("paragraph:0", 0), ("paragraph", 1000)):
        docs = list(read_documents(src, split=split))
        # every block appears once, in order, never split
        joined = [b for d in docs for b in _blocks(d.text)]
        assert joined == blocks
        for d in docs[:-1]:
            assert sum(len(line) + 1 for line in d.text.split("\n") if line.strip()) >= min_chars
        # any subset written and read back gives the same documents (greedy merge is stable)
        pick = [d for d in docs if d.id % 2 == 0] + ([docs[-1]] if len(docs) % 2 == 0 else [])
        out = tmp_path / f"sel-{min_chars}.txt"
        write_documents(pick, out, like=src, split=split)
        _same(pick, list(read_documents(out, split=split)), meta=False)
    assert len(list(read_documents(src, split="paragraph:0"))) == 60


def test_lines_and_file_split(tmp_path):
    src = tmp_path / "x.txt"
    src.write_text("".join(f"line {i}\n" for i in range(10)), encoding="utf-8")
    docs = list(read_documents(src, split="lines:3"))
    assert [d.text for d in docs] == ["line 0\nline 1\nline 2", "line 3\nline 4\nline 5",
                                      "line 6\nline 7\nline 8", "line 9"]
    out = tmp_path / "y.txt"
    write_documents(docs[1:], out, split="lines:3")
    _same(docs[1:], list(read_documents(out, split="lines:3")), meta=False)
    assert [d.text for d in read_documents(src, split="file")] == [src.read_text()[:-1]]


def test_write_selected_every_format(tmp_path):
    ids = [0, 3, 4]
    jl = tmp_path / "p.jsonl"
    _write_jsonl(jl, [{"text": f"t{i}", "k": i} for i in range(6)])
    write_selected(jl, np.array(ids), tmp_path / "s.jsonl", n_docs=6)
    assert [json.loads(x)["k"] for x in open(tmp_path / "s.jsonl")] == ids
    with pytest.raises(ValueError, match="pool changed"):
        write_selected(jl, ids, tmp_path / "s2.jsonl", n_docs=7)
    assert not (tmp_path / "s2.jsonl").exists()
    with pytest.raises(ValueError, match="ids must be in"):
        write_selected(jl, [9], tmp_path / "s3.jsonl")
    with pytest.raises(TypeError, match="ids must be integers"):  # (a float was truncated)
        write_selected(jl, [0.5, 3.0], tmp_path / "s3.jsonl")
    with pytest.raises(TypeError, match="n_docs must be an int"):
        write_selected(jl, ids, tmp_path / "s3.jsonl", n_docs="6")
    assert not (tmp_path / "s3.jsonl").exists()
    write_selected(jl, [], tmp_path / "none.jsonl")  # an empty selection is an empty file
    assert (tmp_path / "none.jsonl").read_text() == ""
    # format conversion: the out suffix decides
    write_selected(jl, ids, tmp_path / "s.parquet")
    assert pq.read_table(tmp_path / "s.parquet").column("k").to_pylist() == ids


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        read_documents(tmp_path / "a.csv")
    jl = tmp_path / "a.jsonl"
    _write_jsonl(jl, [{"text": "x"}, {"body": "y"}])
    with pytest.raises(ValueError, match=r"a.jsonl:2: no field 'text' \(fields: 'body'\)"):
        list(read_documents(jl))
    _write_jsonl(jl, [{"text": 3}])
    with pytest.raises(ValueError, match="must be a string"):
        list(read_documents(jl))
    jl.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        list(read_documents(jl))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="no column 'text'"):
        read_documents(tmp_path / "a.parquet")  # checked at the call, before iterating
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        read_documents(tmp_path / "empty")
    (tmp_path / "t.txt").write_text("x")
    for bad in ("lines", "lines:0", "paragraph:x", "words:3"):
        with pytest.raises(ValueError, match="split"):
            read_documents(tmp_path / "t.txt", split=bad)
    with pytest.raises(ValueError, match="text_field"):
        read_documents(jl, text_field="")
    with pytest.raises(ValueError, match="format must be one of"):
        read_documents(jl, format="csv")
    with pytest.raises(ValueError, match="unknown file type"):
        write_documents([Document(0, "x")], tmp_path / "o.csv")
    assert count_documents(tmp_path / "t.txt") == 1
    (tmp_path / "e.jsonl").write_text("")
    assert count_documents(tmp_path / "e.jsonl") == 0


def test_hf_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets", reason="HF datasets (optional dependency) is not installed")
    ds = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    src = tmp_path / "hf"
    ds.save_to_disk(str(src))
    assert detect_format(src) == "hf"
    docs = list(read_documents(src, text_field="body"))
    assert [d.text for d in docs] == TEXTS and docs[2].meta == {"n": 2}
    write_selected(src, [1, 3], tmp_path / "sel", text_field="body")
    got = datasets.load_from_disk(str(tmp_path / "sel"))
    assert got["body"] == [TEXTS[1], TEXTS[3]] and got.features == ds.features
    # generic writer (documents not from a selection) keeps the features too
    write_documents(docs[:2], tmp_path / "w", like=src, text_field="body")
    _same(docs[:2], list(read_documents(tmp_path / "w", text_field="body")))
    dd = datasets.DatasetDict({"a": ds, "b": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="hf_split"):
        read_documents(tmp_path / "dd", text_field="body")
    assert len(list(read_documents(tmp_path / "dd", text_field="body", hf_split="b"))) == 1


def test_hf_missing_dependency_message(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **kw)

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        read_documents(tmp_path / "hf")
