"""The Ray Data pipeline on local Ray: sources, counts, precise errors, skip mode with a rejects file."""

import json
import re

import pytest

from sft_ray.config import load_config
from sft_ray.data import DataError, check, in_eval_split, tokenized, trainable, validate, write_rejects
from sft_ray.template import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("ray_local")

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _cfg(tiny_model_dir, *overrides):
    return load_config(None, [f"model.name={tiny_model_dir}", *overrides])


def _write_jsonl(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_counts_and_trainable_rows(tmp_path, tiny_model_dir, smol_tok):
    f = _write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD)] * 5 + [""])  # trailing blank line is not a row
    cfg = _cfg(tiny_model_dir)
    ds = tokenized([str(f)], cfg)
    st = validate(ds, "train")
    assert (st.rows, st.bad) == (5, 0)
    rows = trainable(ds, "error").take_all()
    assert len(rows) == 5
    r = rows[0]
    trained = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE_INDEX]
    assert smol_tok.decode(trained) == "hello<|im_end|>"
    assert st.tokens == 5 * len(r["input_ids"]) and st.trained_tokens == 5 * len(trained)


def test_bad_rows_stop_the_run_naming_file_and_line(tmp_path, tiny_model_dir):
    f = _write_jsonl(tmp_path / "bad.jsonl", [
        json.dumps(GOOD),
        '{"messages": [oops',
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        b'{"text": "caf\xe9"}',
        json.dumps({"foo": 1}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps(GOOD),
        json.dumps({"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": "{city: Paris}"}}]}]}),
        json.dumps({"messages": [{"role": "user", "content": "w?"}, {"role": "tool", "content": "18C"},
                                 {"role": "assistant", "content": "18C"}]}),
    ])
    st = validate(tokenized([str(f)], _cfg(tiny_model_dir)), "train")
    assert (st.rows, st.bad) == (2, 7)
    with pytest.raises(DataError) as e:
        check(st, "train", "error")
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(r"bad\.jsonl line (\d+): (.*)", str(e.value))}
    expected = {2: "JSON does not parse", 3: "no assistant turn", 4: "not UTF-8", 5: "matches no known format",
                6: "unknown role 'robot'", 8: "messages[1].tool_calls[0].function.arguments is not valid JSON",
                9: "messages[1] is a tool result with no tool call before it"}
    assert set(lines) == set(expected)
    for line, reason in expected.items():
        assert reason in lines[line], (line, lines[line])
    assert "data.on_bad_rows=skip" in str(e.value)


def test_skip_mode_counts_and_writes_rejects(tmp_path, tiny_model_dir):
    f = _write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(GOOD), "not json", json.dumps(GOOD)])
    cfg = _cfg(tiny_model_dir, "data.on_bad_rows=skip")
    ds = tokenized([str(f)], cfg)
    st = validate(ds, "train")
    check(st, "train", "skip")  # does not raise
    assert (st.rows, st.bad) == (2, 1)
    write_rejects(ds, tmp_path / "rejects")
    rejects = [json.loads(line) for p in (tmp_path / "rejects").glob("*.json") for line in p.read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["row"] == 2 and "JSON does not parse" in rejects[0]["error"]
    assert rejects[0]["record"] == "not json"
    assert len(trainable(ds, "skip").take_all()) == 2
    with pytest.raises(Exception, match="mixed.jsonl line 2"):
        trainable(ds, "error").take_all()


def test_empty_dataset_is_an_error(tmp_path, tiny_model_dir):
    f = _write_jsonl(tmp_path / "empty.jsonl", [""])
    st = validate(tokenized([str(f)], _cfg(tiny_model_dir)), "train")
    with pytest.raises(DataError, match="no usable rows"):
        check(st, "train", "error")


def test_parquet_csv_dirs_globs_and_file_uri(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mix"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]), d / "a.parquet")
    (d / "b.csv").write_text("instruction,input,output\nSay,x,y\nName,,z\n")
    _write_jsonl(d / "c.jsonl", [json.dumps(GOOD)])
    cfg = _cfg(tiny_model_dir)
    assert validate(tokenized([str(d)], cfg), "t").rows == 7
    assert validate(tokenized([str(d / "*.parquet")], cfg), "t").rows == 4
    assert validate(tokenized([f"file://{d}/b.csv"], cfg), "t").rows == 2
    with pytest.raises(Exception, match="no such file"):
        tokenized([str(tmp_path / "nope.jsonl")], cfg)


def test_length_limits_are_counted(tmp_path, tiny_model_dir):
    long = {"messages": [{"role": "user", "content": "w " * 20}, {"role": "assistant", "content": "a " * 100}]}
    f = _write_jsonl(tmp_path / "long.jsonl", [json.dumps(long), json.dumps(GOOD)])
    st = validate(tokenized([str(f)], _cfg(tiny_model_dir, "data.max_length=128")), "t")
    assert (st.rows, st.truncated, st.dropped_too_long) == (2, 1, 0)
    st = validate(tokenized([str(f)], _cfg(tiny_model_dir, "data.max_length=128", "data.too_long=drop")), "t")
    assert (st.rows, st.truncated, st.dropped_too_long) == (1, 0, 1)


def test_eval_fraction_split_is_deterministic_and_disjoint():
    keys = [("f.jsonl", i) for i in range(2000)]
    ev = {k for k in keys if in_eval_split(*k, seed=1, fraction=0.1)}
    assert ev == {k for k in keys if in_eval_split(*k, seed=1, fraction=0.1)}
    assert 120 < len(ev) < 280
    assert ev != {k for k in keys if in_eval_split(*k, seed=2, fraction=0.1)}


def test_preview_shows_what_the_trainer_sees(tmp_path, tiny_model_dir, smol_tok, capsys):
    from sft_ray.cli import main
    from sft_ray.formats import to_example
    from sft_ray.template import tokenize_example

    rows = [GOOD, {"prompt": "2+2?", "completion": "4"}, {"instruction": "Say yes", "output": "yes"}]
    f = _write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    base = ["jobs/configs/local-cpu.yaml", f"model.name={tiny_model_dir}", f"data.train={f}", "data.eval=[]",
            f"output_dir={tmp_path}"]
    assert main(["data", "preview", *base, "--json", "--n", "0"]) == 0
    got = sorted(json.dumps(json.loads(line)) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    want = sorted(json.dumps({"input_ids": t["input_ids"], "labels": t["labels"]})
                  for t in (tokenize_example(to_example(r), smol_tok, 256) for r in rows))
    assert got == want
    assert main(["data", "preview", *base, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[hello<|im_end|>]]" in out or "[[4<|im_end|>]]" in out or "[[yes<|im_end|>]]" in out
    assert "train data: 3 rows" in out


def test_hf_save_to_disk_folder(tmp_path, tiny_model_dir):
    import datasets

    rows = [GOOD] * 3 + [{"messages": [{"role": "user", "content": "only a question"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    st = validate(tokenized([str(tmp_path / "hf")], _cfg(tiny_model_dir)), "train")
    assert (st.rows, st.bad) == (3, 1)
    assert "no assistant turn" in st.errors[0] and str(tmp_path / "hf") in st.errors[0]
    assert re.search(r"\.arrow row 4: ", st.errors[0]), st.errors[0]  # the real row, not a placeholder
    # a DatasetDict folder reads its train split; a folder holding a saved dataset reads its shards only
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD] * 2),
                          "test": datasets.Dataset.from_list([GOOD] * 5)}).save_to_disk(str(tmp_path / "dd"))
    assert validate(tokenized([str(tmp_path / "dd")], _cfg(tiny_model_dir)), "t").rows == 2
    (tmp_path / "mixed").mkdir()
    datasets.Dataset.from_list([GOOD] * 3).save_to_disk(str(tmp_path / "mixed" / "saved"))
    _write_jsonl(tmp_path / "mixed" / "extra.jsonl", [json.dumps(GOOD)] * 2)
    assert validate(tokenized([str(tmp_path / "mixed")], _cfg(tiny_model_dir)), "t").rows == 5


def test_weighted_mix_repeats_and_subsamples_deterministically(tmp_path, tiny_model_dir):
    from sft_ray.data import splits
    from sft_ray.sources import copies

    def rows(name, n):
        return [json.dumps({"prompt": f"{name}{i}", "completion": "x"}) for i in range(n)]

    a = _write_jsonl(tmp_path / "a.jsonl", rows("a", 40))
    b = _write_jsonl(tmp_path / "b.jsonl", rows("b", 40) + ['{"broken'])
    cfg = _cfg(tiny_model_dir, f"data.train=[{a}, {b}]", f"data.weights={{{a}: 2, {b}: 0.25}}",
               "data.on_bad_rows=skip")
    train, _ = splits(cfg.data.train, [], cfg)
    want_b = sum(copies(0.25, str(b), i, cfg.seed) for i in range(1, 41))
    assert 0 < want_b < 40  # a seeded quarter: about 10 of 40, how many exactly depends on the file's path
    st = validate(train, "train")
    assert (st.rows, st.bad) == (80 + want_b, 1)  # a bad row is counted once, whatever its weight
    seen = sorted((r["source"], r["row"]) for r in train.take_all() if not r["error"])
    assert seen.count((str(a), 7)) == 2
    assert seen == sorted((r["source"], r["row"]) for r in splits(cfg.data.train, [], cfg)[0].take_all()
                          if not r["error"])
    # with an eval fraction, only the train split is reweighted and the two splits never share a row
    cfg = _cfg(tiny_model_dir, f"data.train=[{a}, {b}]", f"data.weights={{{a}: 3}}", "data.eval_fraction=0.25",
               "data.on_bad_rows=skip")
    tr, ev = splits(cfg.data.train, [], cfg)
    held = [r for r in range(1, 41) if in_eval_split(str(a), r, cfg.seed, 0.25)]
    ev_rows = [(r["source"], r["row"]) for r in ev.take_all() if not r["error"]]
    tr_rows = [(r["source"], r["row"]) for r in tr.take_all() if not r["error"]]
    assert sorted(r for s, r in ev_rows if s == str(a)) == held
    assert len([1 for s, _ in tr_rows if s == str(a)]) == 3 * (40 - len(held))
    assert not set(ev_rows) & set(tr_rows)


def test_weights_must_name_train_specs():
    from sft_ray.config import ConfigError

    with pytest.raises(ConfigError, match="not in data.train"):
        load_config(None, ["data.train=[a.jsonl]", "data.weights={b.jsonl: 2}"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(None, ["data.train=[a.jsonl]", "data.weights={a.jsonl: 0}"])


def test_length_percentiles_are_exact_and_never_above_the_longest_row():
    from sft_ray.data import percentiles

    assert percentiles({51: 1, 40: 99}) == {"p50": 40, "p90": 40, "p99": 40}
    assert percentiles({n: 1 for n in range(1, 101)}) == {"p50": 50, "p90": 90, "p99": 99}
    import random

    rng = random.Random(0)
    for _ in range(100):
        counts = {rng.randint(1, 60): rng.randint(1, 5) for _ in range(rng.randint(1, 20))}
        p = percentiles(counts)
        assert p["p50"] <= p["p90"] <= p["p99"] <= max(counts) and all(v in counts for v in p.values())


def test_warmed_workers_run_the_tokenizer_tasks_and_a_tokenizer_is_unpickled_once_per_process(tmp_path, tiny_model_dir):
    """``data.warm_workers`` imports the pipeline's code in idle workers, and the pipeline's tasks then run in
    those processes; a second pipeline over the same tokenizer (the training stream after the validation pass)
    finds it already unpickled there, under the same digest."""
    import os

    import ray

    from sft_ray import data

    warmed = set(ray.get(data.warm_workers()))
    assert warmed and os.getpid() not in warmed
    f = _write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD)] * 40)
    cfg = _cfg(tiny_model_dir)
    digest = data._tokenizer_and_digest(cfg.model)[1]

    def where(batch):
        return {"pid": [os.getpid()] * len(batch["row"]),
                "cached": [list(data._TASK_TOKENIZER) == [digest]] * len(batch["row"])}

    first = tokenized([str(f)], cfg).map_batches(where, num_cpus=cfg.data.tokenize_cpus).take_all()
    assert {r["pid"] for r in first} & warmed
    again = tokenized([str(f)], cfg).map_batches(where, num_cpus=cfg.data.tokenize_cpus).take_all()
    assert all(r["cached"] for r in again)
    assert data._tokenizer_and_digest(cfg.model)[1] == digest
