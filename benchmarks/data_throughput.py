"""Data pipeline throughput: tokenize + mask N generated chat rows through the Ray Data pipeline and, in the
same run, through `datasets.map(num_proc=2)` with the same tokenizer and the same function (`template.tokenize_examples`).

    .venv/bin/python benchmarks/data_throughput.py [--rows 100000] [--shards 4]

Both start from the same JSONL shards and end with every row tokenized and masked (rows and tokens counted on
the Arrow columns, not converted to Python in the driver). As in ``sft-ray train``, Ray is started, its idle
workers are warmed (``data.warm_workers``; ``--no-warm`` skips it) and then the driver loads the tokenizer;
both clocks start once the driver holds it. Last line: JSON with rows/s for both and their ratio (Ray Data
over datasets), and, for Ray Data, when its first batch arrived and its rate after that (its fixed start: the
executor's actors, fresh worker processes, the tokenizer unpickled in each).
"""

import argparse
import json
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
    ap.add_argument("--no-warm", action="store_true", help="do not warm Ray's workers while the tokenizer loads")
    ap.add_argument("overrides", nargs="*", help="config key=value for the Ray side, e.g. data.tokenize_cpus=1")
    a = ap.parse_args()

    import datasets
    import pyarrow.compute as pc

    from sft_ray import data, synthetic
    from sft_ray.config import load_config
    from sft_ray.formats import to_example
    from sft_ray.template import tokenize_examples
    from sft_ray.cluster import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="sft-ray-databench-"))
    rows = synthetic.generate(a.rows, seed=1)
    per = (len(rows) + a.shards - 1) // a.shards
    files = [str(synthetic.write_jsonl(rows[i * per:(i + 1) * per], tmp / f"part-{i}.jsonl")) for i in range(a.shards)]
    cfg = load_config(None, [f"model.name={a.model}", "data.max_length=512", *a.overrides])
    init_ray(cfg)
    if not a.no_warm:
        data.warm_workers()
    tok = data._tokenizer(cfg.model)  # the tokenizer both sides use (loaded once, outside the timings)

    def tokens(col) -> int:
        return int(pc.sum(pc.list_value_length(col)).as_py() or 0)

    # 1. Ray Data: the pipeline the trainers read from
    t0 = time.time()
    n_ray = tokens_ray = 0
    first: tuple[float, int] | None = None  # (seconds, rows) when the first batch arrived: Ray Data's fixed start
    for b in data.trainable(data.tokenized(files, cfg), "error", cfg.data.tokenize_cpus).iter_batches(batch_size=4096, batch_format="pyarrow"):
        n_ray += b.num_rows
        tokens_ray += tokens(b.column("input_ids"))
        first = first or (time.time() - t0, n_ray)
    ray_s = time.time() - t0
    steady = (n_ray - first[1]) / max(ray_s - first[0], 1e-9)
    import ray

    ray.shutdown()  # datasets.map runs as its users run it: without Ray's processes beside it

    # 2. datasets.map(num_proc) with the same function (rows normalised, then rendered, tokenized and masked
    # in a batch, as the Ray pipeline's tasks do)
    def fn(batch, tok=tok, max_length=cfg.data.max_length):
        ts = tokenize_examples([to_example({"messages": m}) for m in batch["messages"]], tok, max_length)
        return {"input_ids": [t["input_ids"] for t in ts], "labels": [t["labels"] for t in ts]}

    t0 = time.time()
    d = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp / "hf-cache"))
    d = d.map(fn, batched=True, batch_size=256, num_proc=a.num_proc, remove_columns=d.column_names,
              load_from_cache_file=False)
    n_hf = len(d)
    tokens_hf = tokens(d.data.column("input_ids"))
    hf_s = time.time() - t0

    assert (n_ray, tokens_ray) == (n_hf, tokens_hf), ((n_ray, tokens_ray), (n_hf, tokens_hf))
    print(f"rows {n_ray}, tokens {tokens_ray}")
    print(f"ray data pipeline          : {ray_s:7.1f} s  {n_ray / ray_s:8.0f} rows/s  (first batch after {first[0]:.1f} s; "
          f"{steady:.0f} rows/s after it)")
    print(f"datasets.map(num_proc={a.num_proc})   : {hf_s:7.1f} s  {n_hf / hf_s:8.0f} rows/s")
    print(json.dumps({"ray_rows_per_s": round(n_ray / ray_s, 1), "datasets_rows_per_s": round(n_hf / hf_s, 1),
                      "ratio_ray_vs_datasets": round(hf_s / ray_s, 3), "rows": n_ray,
                      "ray_first_batch_s": round(first[0], 1), "ray_rows_per_s_after_first_batch": round(steady, 1),
                      "warm": not a.no_warm}))


if __name__ == "__main__":
    main()
