"""Data pipeline throughput: tokenize + mask N generated chat rows through the Ray Data pipeline and, in the
same run, through `datasets.map(num_proc=2)` with the same tokenizer and the same function (`template.tokenize_examples`).

    .venv/bin/python benchmarks/data_throughput.py [--rows 100000] [--shards 4] [--repeat 3] [data.tokenize_cpus=1]

Both start from the same JSONL shards and end with every row tokenized and masked (rows and tokens counted on
the Arrow columns, not converted to Python in the driver). As in ``sft-ray train``, Ray is started, its idle
workers are warmed (``data.warm_workers``; ``--no-warm`` skips it) and then the driver loads the tokenizer;
both clocks start once the driver holds it.

A third line is a bound, not a pipeline sft-ray runs: the same rows split evenly over ``--num-proc`` plain Ray
tasks that each read their lines and run the same per-row function (``data.tokenize_batch``), with no Ray Data
executor, reader or streaming, started once the warmed workers are idle. It shows what Ray itself costs on the
machine, so that Ray Data's own cost (its start, its executor and actors, the reader, contention from more tasks
than cores, warm-up still running when its clock starts) reads as the difference.

This machine's speed drifts by ±20-30% over minutes (every process slows together), so each repeat runs the
three side by side (Ray Data, plain tasks, datasets.map) in a fresh process (a repeat starts as a run starts:
the driver's imports, then Ray's start), and the ratios are per repeat, with their median. Last line: JSON
with the medians and every repeat.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="side-by-side repeats, each in a fresh process")
    ap.add_argument("--no-warm", action="store_true", help="do not warm Ray's workers while the tokenizer loads")
    ap.add_argument("--one", metavar="DIR", help=argparse.SUPPRESS)  # one repeat on DIR's shards (a child)
    ap.add_argument("overrides", nargs="*", help="config key=value for the Ray side, e.g. data.tokenize_cpus=1")
    a = ap.parse_args()
    if a.one:
        return one_repeat(a)

    from sft_ray import synthetic

    tmp = Path(tempfile.mkdtemp(prefix="sft-ray-databench-"))
    rows = synthetic.generate(a.rows, seed=1)
    per = (len(rows) + a.shards - 1) // a.shards
    for i in range(a.shards):
        synthetic.write_jsonl(rows[i * per:(i + 1) * per], tmp / f"part-{i}.jsonl")
    child = [sys.executable, __file__, "--one", str(tmp), "--model", a.model, "--num-proc", str(a.num_proc),
             *(["--no-warm"] if a.no_warm else []), *a.overrides]
    runs = []
    for r in range(a.repeat):  # a fresh process each time: every repeat starts as a run starts (imports included)
        p = subprocess.run(child, capture_output=True, text=True)
        found = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not found:
            sys.exit(f"repeat {r + 1} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        run = json.loads(found[-1][len("RESULT "):])
        runs.append(run)
        print(f"repeat {r + 1}/{a.repeat}: rows {run['rows']}, tokens {run['tokens']}")
        print(f"  ray data pipeline          : {run['ray_s']:7.1f} s  {run['ray_rows_per_s']:8.0f} rows/s  (first "
              f"batch after {run['ray_first_batch_s']:.1f} s; {run['ray_rows_per_s_after_first_batch']:.0f} rows/s "
              "after it)")
        print(f"  plain ray tasks (bound)    : {run['plain_tasks_s']:7.1f} s  {run['plain_tasks_rows_per_s']:8.0f} rows/s")
        print(f"  datasets.map(num_proc={a.num_proc})   : {run['datasets_s']:7.1f} s  "
              f"{run['datasets_rows_per_s']:8.0f} rows/s")
        print(f"  ray data / datasets.map {run['ratio_ray_vs_datasets']:.3f}, plain tasks / datasets.map "
              f"{run['ratio_plain_tasks_vs_datasets']:.3f}, ray data / plain tasks {run['ratio_ray_vs_plain_tasks']:.3f}",
              flush=True)
    median = {k: round(statistics.median(run[k] for run in runs), 3) for k in runs[0] if k not in ("rows", "tokens")}
    print(f"median of {len(runs)}: ray data / datasets.map {median['ratio_ray_vs_datasets']:.3f}, ray data "
          f"{median['ray_rows_per_s']:.0f} rows/s, datasets.map {median['datasets_rows_per_s']:.0f} rows/s, plain tasks "
          f"/ datasets.map {median['ratio_plain_tasks_vs_datasets']:.3f}")
    print(json.dumps({"median": median, "repeats": runs, "rows": a.rows, "warm": not a.no_warm,
                      "overrides": a.overrides}))


def one_repeat(a) -> None:
    """One repeat, in this (fresh) process: Ray Data, the plain-task bound, datasets.map; a RESULT line."""
    from sft_ray.config import load_config

    files = sorted(str(p) for p in Path(a.one).glob("part-*.jsonl"))
    cfg = load_config(None, [f"model.name={a.model}", "data.max_length=512", *a.overrides])
    ray_s, first, n_ray, tokens_ray = ray_data(files, cfg, warm=not a.no_warm)
    plain_s, n_plain, tokens_plain = plain_tasks(files, cfg, a.num_proc)
    hf_s, n_hf, tokens_hf = datasets_map(files, cfg, a.num_proc, Path(tempfile.mkdtemp(prefix="hf-cache-", dir=a.one)))
    assert (n_ray, tokens_ray) == (n_hf, tokens_hf) == (n_plain, tokens_plain), \
        ((n_ray, tokens_ray), (n_hf, tokens_hf), (n_plain, tokens_plain))
    steady = (n_ray - first[1]) / max(ray_s - first[0], 1e-9)
    print("RESULT " + json.dumps({
        "rows": n_ray, "tokens": tokens_ray, "ray_s": round(ray_s, 2), "plain_tasks_s": round(plain_s, 2),
        "datasets_s": round(hf_s, 2), "ray_rows_per_s": round(n_ray / ray_s, 1),
        "datasets_rows_per_s": round(n_hf / hf_s, 1), "plain_tasks_rows_per_s": round(n_plain / plain_s, 1),
        "ratio_ray_vs_datasets": round(hf_s / ray_s, 3), "ratio_plain_tasks_vs_datasets": round(hf_s / plain_s, 3),
        "ratio_ray_vs_plain_tasks": round(plain_s / ray_s, 3), "ray_first_batch_s": round(first[0], 1),
        "ray_rows_per_s_after_first_batch": round(steady, 1)}), flush=True)


def _start_ray(cfg, warm: bool, wait: bool = False):
    """Ray started and warmed as ``sft-ray train`` does, then the driver's tokenizer loaded (the process's first
    load imports transformers); ``wait``: also wait until the warmed workers are idle. Returns the tokenizer."""
    import ray

    from sft_ray import data
    from sft_ray.cluster import init_ray

    init_ray(cfg)
    refs = data.warm_workers() if warm else []
    tok = data._tokenizer(cfg.model)
    if wait:
        ray.get(refs)
    return tok


def _tokens(col) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(col)).as_py() or 0)


def ray_data(files, cfg, warm: bool):
    """The pipeline the trainers read from; (seconds, (seconds, rows) at the first batch, rows, tokens)."""
    import ray

    from sft_ray import data

    _start_ray(cfg, warm)
    t0 = time.time()
    n = tokens = 0
    first: tuple[float, int] | None = None  # when the first batch arrived: Ray Data's fixed start
    for b in data.trainable(data.tokenized(files, cfg), "error", cfg.data.tokenize_cpus).iter_batches(
            batch_size=4096, batch_format="pyarrow"):
        n += b.num_rows
        tokens += _tokens(b.column("input_ids"))
        first = first or (time.time() - t0, n)
    seconds = time.time() - t0
    ray.shutdown()
    return seconds, first, n, tokens


def _plain_task(parts, tok_ref, data_cfg):
    """One plain Ray task of the bound: (file, first line, end line) ranges read, parsed, tokenized, masked."""
    import pyarrow as pa
    import ray

    from sft_ray import data
    from sft_ray.config import DataConfig

    tok, dc, ints, tables = ray.get(tok_ref[0]), DataConfig.model_validate(data_cfg), pa.list_(pa.int64()), []
    for path, lo, hi in parts:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()[lo:hi]
        for i in range(0, len(lines), 256):
            chunk = lines[i:i + 256]
            out = data.tokenize_batch({"record": chunk, "row": list(range(lo + i + 1, lo + i + 1 + len(chunk))),
                                       "error": [""] * len(chunk), "source": [path] * len(chunk)}, tok, dc)
            assert not any(out["error"]), out["error"]
            tables.append(pa.table({"input_ids": pa.array(out["input_ids"], ints),
                                    "labels": pa.array(out["labels"], ints)}))
    return pa.concat_tables(tables)


def plain_tasks(files, cfg, k: int):
    """The bound: rows split evenly over ``k`` plain Ray tasks of 1 CPU, in workers already warmed (nothing left
    to start when the clock starts); (seconds, rows, tokens)."""
    import ray

    tok = _start_ray(cfg, warm=True, wait=True)
    counts = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            counts.append(sum(1 for _ in f))
    total, per = sum(counts), -(-sum(counts) // k)
    task = ray.remote(num_cpus=1, max_retries=0)(_plain_task)
    t0 = time.time()
    tok_ref = [ray.put(tok)]
    shares, start = [], 0
    for _ in range(k):  # rows [start, start + per) of the files' concatenation, as (file, lo, hi) ranges
        parts, offset = [], 0
        for path, c in zip(files, counts):
            lo, hi = max(start - offset, 0), min(start + per - offset, c)
            if lo < hi:
                parts.append((path, lo, hi))
            offset += c
        shares.append(task.remote(parts, tok_ref, cfg.data.model_dump()))
        start += per
    tables = ray.get(shares)
    seconds = time.time() - t0
    n, tokens = sum(t.num_rows for t in tables), sum(_tokens(t.column("input_ids")) for t in tables)
    assert n == total, (n, total)
    ray.shutdown()
    return seconds, n, tokens


def datasets_map(files, cfg, num_proc: int, cache: Path):
    """``datasets.map(num_proc)`` with the same function (rows normalised, then rendered, tokenized and masked in
    a batch, as the Ray pipeline's tasks do), run as its users run it: without Ray's processes beside it."""
    import datasets

    from sft_ray import data
    from sft_ray.formats import to_example
    from sft_ray.template import tokenize_examples

    datasets.disable_progress_bars()
    tok = data._tokenizer(cfg.model)  # the driver's, loaded before the clocks of the other two sides

    def fn(batch, tok=tok, max_length=cfg.data.max_length):
        ts = tokenize_examples([to_example({"messages": m}) for m in batch["messages"]], tok, max_length)
        return {"input_ids": [t["input_ids"] for t in ts], "labels": [t["labels"] for t in ts]}

    t0 = time.time()
    d = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(cache))
    d = d.map(fn, batched=True, batch_size=256, num_proc=num_proc, remove_columns=d.column_names,
              load_from_cache_file=False)
    n, tokens = len(d), _tokens(d.data.column("input_ids"))
    return time.time() - t0, n, tokens


if __name__ == "__main__":
    main()
