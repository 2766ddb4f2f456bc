"""Every documented source kind works in both places it is read: as training data (tokenized, counted) and as
eval data (the before/after prompts), through the one Ray Data read path; and files as users have them
(a byte-order mark, a JSON array, a file cut off part-way, an empty file) are read or refused precisely."""

import gzip
import io
import json

import pytest

from sft_ray.config import load_config
from sft_ray.data import DataError, check, tokenized, validate
from sft_ray.evaluate import eval_pairs
from sft_ray.sources import _json_array, iter_file

pytestmark = pytest.mark.usefixtures("ray_local")


def _row(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


ROWS = [_row(i) for i in range(6)]


def _jsonl(path, rows, prefix=b""):
    path.write_bytes(prefix + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    return str(path)


def _make(kind, tmp_path):
    """A spec of each documented kind, holding ROWS (as the kind stores them)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(6)]
    d = tmp_path / kind
    d.mkdir()
    if kind == "jsonl":
        return _jsonl(d / "a.jsonl", ROWS)
    if kind == "jsonl_bom":  # what several Windows tools write
        return _jsonl(d / "a.jsonl", ROWS, prefix=b"\xef\xbb\xbf")
    if kind == "jsonl_gz":
        (d / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)))
        return str(d / "a.jsonl.gz")
    if kind == "json_array":
        (d / "a.json").write_text(json.dumps(ROWS, indent=2))
        return str(d / "a.json")
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(flat), d / "a.parquet")
        return str(d / "a.parquet")
    if kind == "csv":
        (d / "a.csv").write_text("prompt,completion\n" + "".join(f"question {i},answer {i}\n" for i in range(6)))
        return str(d / "a.csv")
    if kind == "directory":
        _jsonl(d / "a.jsonl", ROWS[:3])
        _jsonl(d / "b.jsonl", ROWS[3:])
        return str(d)
    if kind == "glob":
        _jsonl(d / "a.jsonl", ROWS[:2])
        _jsonl(d / "b.jsonl", ROWS[2:])
        return str(d / "*.jsonl")
    if kind == "file_uri":
        return "file://" + _jsonl(d / "a.jsonl", ROWS)
    if kind == "save_to_disk":
        datasets.Dataset.from_list(ROWS).save_to_disk(str(d / "saved"))
        return str(d / "saved")
    if kind == "hf_local_repo":  # a dataset repository as `datasets.load_dataset` reads it, offline
        (d / "data").mkdir()
        _jsonl(d / "data" / "train.jsonl", ROWS[:1])
        _jsonl(d / "data" / "test.jsonl", ROWS)
        return f"hf:{d}:test"
    raise ValueError(kind)


KINDS = ["jsonl", "jsonl_bom", "jsonl_gz", "json_array", "parquet", "csv", "directory", "glob", "file_uri",
         "save_to_disk", "hf_local_repo"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_trains_and_evaluates(kind, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = _make(kind, tmp_path)
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    st = validate(tokenized([spec], cfg), "train")  # the training position
    assert (st.rows, st.bad) == (6, 0), st.errors
    pairs = eval_pairs([spec], "auto", {}, limit=4)  # the eval position: the same read path
    assert len(pairs) == 4
    assert [ref for _, ref, _ in pairs] == [f"answer {i}" for i in range(4)]  # the first rows, in order
    assert pairs[0][0][-1] == {"role": "user", "content": "question 0"}


def test_json_array_is_read_item_by_item():
    items = [{"messages": [{"role": "user", "content": "a [x], {y}, \"z\""}, {"role": "assistant", "content": "ok"}]},
             {"text": "ü" * 10}, {"text": "]"}]
    data = json.dumps(items, indent=2).encode()
    rows = list(_json_array(io.BytesIO(data), "f.json", chunk=7))  # items cross many chunk boundaries
    assert [json.loads(r["record"]) for r in rows] == items
    lines = data.decode().split("\n")  # each row is numbered by the line its item starts on
    assert [lines[r["row"] - 1].strip()[:1] for r in rows] == ["{"] * 3 and [r["row"] for r in rows] == [2, 14, 17]
    bad = list(_json_array(io.BytesIO(b'[{"text": "a"},\n {"text": oops}]'), "f.json", chunk=5))
    assert bad[0]["record"] and bad[1]["row"] == 2 and "item 2 (line 2) does not parse" in bad[1]["error"]
    assert "reading stopped after item 1 (the 1 items before it are kept" in bad[1]["error"]


@pytest.mark.parametrize("tail, reason", [
    (b"]\n[" + json.dumps({"text": "lost"}).encode() + b"]", "more data after the array's closing ']' (line 3"),
    (b', {"text": "caf\xe9"}]', "not UTF-8 text at byte 45 of the file"),
])
def test_what_stops_a_json_array_is_said_after_the_items_before_it(tail, reason):
    """Two arrays run together (``cat a.json b.json``) or a byte that is not UTF-8: every item before it is a row,
    and one error row after them says why reading stopped, never a silent end."""
    data = b'[{"text": "a"},\n {"text": "b"}' + tail
    rows = list(_json_array(io.BytesIO(data), "f.json", chunk=8))
    assert [json.loads(r["record"]) for r in rows[:2]] == [{"text": "a"}, {"text": "b"}]
    assert len(rows) == 3 and reason in rows[2]["error"] and "reading stopped after item 2" in rows[2]["error"], rows


def test_table_cells_are_text_as_written(tmp_path):
    """CSV cells are read as text ("4", "true", "3.10", "NA" stay what they say; only an empty cell is missing);
    Parquet text stored as binary is decoded, never written as b'...'; binary that is not UTF-8 is a bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "t.csv"
    csv.write_text('prompt,completion\nWhat is 2+2?,4\nIs it?,true\nPi?,3.10\nSay NA,NA\nSay null,null\nq,""\n')
    got = [json.loads(r["record"]) for r in iter_file(str(csv))]
    assert [g["completion"] for g in got] == ["4", "true", "3.10", "NA", "null", ""]
    pq.write_table(pa.table({"prompt": pa.array([b"q1", b"q2"], pa.binary()),
                             "completion": pa.array([b"caf\xc3\xa9", b"caf\xe9"], pa.binary())}), tmp_path / "b.parquet")
    rows = list(iter_file(str(tmp_path / "b.parquet")))
    assert json.loads(rows[0]["record"]) == {"prompt": "q1", "completion": "café"}
    assert rows[1]["record"] == "" and "binary value is not UTF-8 text" in rows[1]["error"]


def test_folders_list_data_files_in_any_case_and_refuse_compression_they_cannot_read(tmp_path):
    from sft_ray.sources import SourceError, expand

    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "B.JSONL").write_text("{}\n")
    (tmp_path / "README.md").write_text("not data")
    assert [p.rsplit("/", 1)[1] for p in expand(str(tmp_path))] == ["B.JSONL", "a.jsonl"]
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(SourceError, match="c.jsonl.zst: compressed in a way sft-ray does not read"):
        expand(str(tmp_path))
    # the same folder as a URI prefix or glob (how object storage is named) is refused the same way
    for spec in (f"file://{tmp_path}", f"file://{tmp_path}/", f"file://{tmp_path}/*.jsonl*"):
        with pytest.raises(SourceError, match="c.jsonl.zst: compressed in a way sft-ray does not read"):
            expand(spec)
    (tmp_path / "c.jsonl.zst").unlink()
    assert [p.rsplit("/", 1)[1] for p in expand(f"file://{tmp_path}")] == ["B.JSONL", "a.jsonl"]


def test_a_cut_gzip_file_keeps_every_whole_line_before_the_cut(tmp_path):
    import zlib

    body = b"".join(json.dumps({"text": f"row {i} " + "x" * (i % 50)}).encode() + b"\n" for i in range(5000))
    whole = gzip.compress(body)
    cut = whole[: len(whole) // 2]
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    readable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)
    whole_lines = readable.count(b"\n")
    rows = []
    with pytest.raises(EOFError):  # _read_files turns it into the error row after them (test above)
        for r in iter_file(str(tmp_path / "cut.jsonl.gz")):
            rows.append(r)
    assert len(rows) == whole_lines > 1000, (len(rows), whole_lines)


def test_a_file_cut_off_part_way_says_where_reading_stopped(tmp_path, tiny_model_dir):
    whole = gzip.compress(b"".join(json.dumps(_row(i)).encode() + b"\n" for i in range(3000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "data.on_bad_rows=skip"])
    st = validate(tokenized([str(path)], cfg), "train")
    assert st.bad == 1 and 0 < st.rows < 3000
    assert f"cut.jsonl.gz line {st.rows + 1}: reading stopped after row {st.rows}" in st.errors[0], st.errors
    assert f"the {st.rows} rows read before it are kept" in st.errors[0]


def test_empty_data_names_the_file(tmp_path, tiny_model_dir, capsys):
    from sft_ray.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    st = validate(tokenized([str(empty)], cfg), "train")
    with pytest.raises(DataError, match=f"no usable rows: {empty}"):
        check(st, "train", "error", [str(empty)])
    args = ["jobs/configs/local-cpu.yaml", f"model.name={tiny_model_dir}", f"data.train={empty}",
            f"output_dir={tmp_path}"]
    assert main(["data", "preview", *args]) == 1
    assert str(empty) in capsys.readouterr().err


def test_streamed_jsonl_lines_are_numbered_like_the_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\r\n' + b'{"text": "' + b"c" * 3_000_000 + b'"}\n')
    rows = list(iter_file(str(p)))
    assert [r["row"] for r in rows] == [1, 3, 4] and json.loads(rows[1]["record"]) == {"text": "b"}
    assert len(json.loads(rows[2]["record"])["text"]) == 3_000_000
