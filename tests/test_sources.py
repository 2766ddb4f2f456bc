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
    assert [ref for _, ref in pairs] == [f"answer {i}" for i in range(4)]  # the first rows, in order
    assert pairs[0][0][-1] == {"role": "user", "content": "question 0"}


def test_json_array_is_read_item_by_item():
    items = [{"messages": [{"role": "user", "content": "a [x], {y}, \"z\""}, {"role": "assistant", "content": "ok"}]},
             {"text": "ü" * 10}, {"text": "]"}]
    data = json.dumps(items).encode()
    rows = list(_json_array(io.BytesIO(data), "f.json", chunk=7))  # items cross many chunk boundaries
    assert [json.loads(r["record"]) for r in rows] == items and [r["row"] for r in rows] == [1, 2, 3]
    bad = list(_json_array(io.BytesIO(b'[{"text": "a"}, {"text": oops}]'), "f.json", chunk=5))
    assert bad[0]["record"] and bad[1]["row"] == 2 and "item 2 does not parse" in bad[1]["error"]


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
