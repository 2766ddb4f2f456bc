"""The Ray Data pipeline: read -> parse -> normalise -> chat template -> tokenize -> loss mask.

Tokenization happens here, in parallel Ray tasks, and the trainers receive rows that are already
``input_ids`` + ``labels``; TRL's own dataset preparation (which calls ``.map``) is skipped. A
validation pass (parallel, streaming) checks every row and counts rows and tokens before training,
which is what sets ``max_steps`` for a stream that has no length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_ray.formats import Example, RowError, to_example
from sft_ray.template import IGNORE_INDEX, TooLong, tokenize_examples

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 20


class DataError(ValueError):
    pass


def find_data_error(e: BaseException) -> str | None:
    """The message of a DataError that a remote task raised, however Ray Data and Ray Train wrapped it."""
    import re

    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DataError):
            return str(x)
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]
        failures = getattr(x, "worker_failures", None)
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    found = re.findall(r"DataError: (.+)", str(e))
    return found[-1].strip() if found else None


def where(source: str, row: int) -> str:
    """``file line N`` for JSON files (JSON Lines and arrays are numbered by line), ``file row N`` for tables."""
    from sft_ray.sources import _kind

    unit = "line" if _kind(source) in ("jsonl", "json") else "row"
    return f"{source} {unit} {row}" if row else source


_DRIVER_TOKENIZERS: dict[str, tuple[Any, str]] = {}  # model config JSON -> (tokenizer, digest), in the driver
_TASK_TOKENIZER: dict[str, Any] = {}  # tokenizer digest -> tokenizer, in a Ray Data worker process (one at a time)


def _tokenizer(model_cfg) -> Any:
    """The driver's tokenizer for ``model_cfg``, loaded once per process."""
    return _tokenizer_and_digest(model_cfg)[0]


def _tokenizer_and_digest(model_cfg) -> tuple[Any, str]:
    """The tokenizer and a digest of its pickled state: workers keep one unpickled tokenizer per digest, so
    the validation pass, the training stream and the eval split of a run unpickle it once per process, and a
    tokenizer that changed on disk under the same config is never mistaken for the old one."""
    import pickle

    from sft_ray.modeling import load_tokenizer

    key = model_cfg.model_dump_json()
    if key not in _DRIVER_TOKENIZERS:
        tok = load_tokenizer(model_cfg)
        _DRIVER_TOKENIZERS[key] = (tok, hashlib.blake2b(pickle.dumps(tok), digest_size=16).hexdigest())
    return _DRIVER_TOKENIZERS[key]


def _tokenize_task(batch: dict[str, np.ndarray], tok_ref: list, tok_digest: str, data_cfg: dict) -> dict[str, list]:
    """Ray Data task. The tokenizer arrives pickled through the object store and is kept per worker process:
    unpickling takes ~1 s and no torch, where loading it with transformers' Auto classes takes ~6 s of
    imports in every fresh process."""
    import ray

    from sft_ray.config import DataConfig

    if tok_digest not in _TASK_TOKENIZER:
        _TASK_TOKENIZER.clear()
        _TASK_TOKENIZER[tok_digest] = ray.get(tok_ref[0])
    return tokenize_batch(batch, _TASK_TOKENIZER[tok_digest], DataConfig.model_validate(data_cfg))


def _warm() -> int:
    """What a tokenizer task imports before its first row (~3 s of CPU in a fresh worker process)."""
    import ray.data  # noqa: F401
    import transformers.tokenization_utils_tokenizers  # noqa: F401  (unpickling the tokenizer needs it)
    import transformers.utils.chat_template_utils  # noqa: F401

    import sft_ray.config  # noqa: F401
    import sft_ray.sources  # noqa: F401
    import sft_ray.template  # noqa: F401

    try:  # what unpickling Ray Data's map task imports (its issue detectors pull in the state API and pydantic)
        import ray.data._internal.issue_detection.detectors  # noqa: F401
        import ray.data._internal.planner.plan_udf_map_op  # noqa: F401
    except ImportError:  # internal modules that a Ray upgrade may move: the first task imports what it needs
        pass
    return os.getpid()


def warm_workers(limit: int = 64) -> list:
    """Start importing the pipeline's modules in idle worker processes, one task per CPU, without waiting.

    A fresh worker spends ~3 s importing Ray Data, transformers' tokenizer classes and the template code before
    its first row, and on a small machine those imports, not the rows, are most of the time to the first
    batch. Called right after Ray starts, the imports overlap with what the driver does before its data
    (checks, loading the tokenizer); Ray hands the warmed processes to the pipeline's tasks."""
    import ray

    n = max(1, min(limit, int(ray.cluster_resources().get("CPU", 1))))
    warm = ray.remote(num_cpus=1, max_retries=0)(_warm)
    refs = [warm.remote() for _ in range(n)]
    try:  # Ray Data's two per-cluster actors, which its first pipeline would otherwise start (~2.5 s of CPU each)
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as e:  # internal helpers that a Ray upgrade may move: the pipeline starts them itself
        log.debug("Ray Data's actors not started early: %s", e)
    return refs


def parse_record(record: str, data) -> Example:
    """One row's JSON text as an ``Example``; ``RowError`` says why it is not one."""
    try:
        obj = json.loads(record)
    except json.JSONDecodeError as e:
        raise RowError(f"JSON does not parse: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RowError(f"a record must be a JSON object, got {type(obj).__name__}")
    return to_example(obj, data.format, data.columns)


def tokenize_batch(batch: dict[str, Any], tok, data) -> dict[str, list]:
    """Parse, render, tokenize and mask a block of provenance rows; bad and dropped rows stay, flagged."""
    n = len(batch["row"])
    errors = [str(e) for e in batch["error"]]
    examples: list[Example] = []
    where_ok: list[int] = []
    for k, record in enumerate(batch["record"]):
        if errors[k]:
            continue
        try:
            examples.append(parse_record(record, data))
            where_ok.append(k)
        except RowError as e:
            errors[k] = str(e)
    results: list[Any] = [None] * n
    for k, t in zip(where_ok, tokenize_examples(examples, tok, data.max_length, data.loss_on, data.too_long,
                                                data.template_kwargs, data.train_reasoning)):
        results[k] = t
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "n_tokens", "n_trained", "truncated", "dropped")}
    for k, t in enumerate(results):
        if isinstance(t, RowError):
            errors[k] = str(t)
        good = isinstance(t, dict)
        out["input_ids"].append(t["input_ids"] if good else [])
        out["labels"].append(t["labels"] if good else [])
        out["n_tokens"].append(t["n_tokens"] if good else 0)
        out["n_trained"].append(t["n_trained"] if good else 0)
        out["truncated"].append(t["truncated"] if good else False)
        out["dropped"].append(str(t) if isinstance(t, TooLong) else "")
    out["source"] = [str(s) for s in batch["source"]]
    out["row"] = [int(r) for r in batch["row"]]
    out["error"] = errors
    out["record"] = [str(r)[:2000] if e else "" for r, e in zip(batch["record"], errors)]
    out["weight"] = [float(w) for w in batch.get("weight", [1.0] * n)]
    out["file"] = [int(f) for f in batch.get("file", [0] * n)]
    return out


def in_eval_split(source: str, row: int, seed: int, fraction: float) -> bool:
    """Deterministic by (seed, file, row), so every process and every rerun agrees."""
    return zlib.crc32(f"{seed}:{source}:{row}".encode()) % 100_000 < fraction * 100_000


BLOCK_BYTES = 1 << 20


def quiet_ray_data() -> None:
    """Ray Data settings for text: no progress bars (sft-ray prints its own progress), and 1 MiB blocks
    instead of 128 MiB, so that a file's rows spread over many tokenizer tasks and reach the trainers
    while later rows are still being tokenized (text rows are small; big blocks meant one task per file)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def tokenized(specs: list[str], cfg, split: str | None = None, weights: list[float] | None = None,
              num_cpus: float | None = None):
    """Dataset of tokenized rows (bad and dropped rows still present, flagged) for ``specs``.

    ``weights`` (train data only) repeat or subsample each spec's rows; the eval split is never reweighted.
    ``num_cpus``: per task (default ``data.tokenize_cpus``); 0 where the data streams beside trainers that
    hold every CPU of the cluster."""
    import ray

    from sft_ray import sources

    quiet_ray_data()
    cpus = cfg.data.tokenize_cpus if num_cpus is None else num_cpus
    if split == "eval":
        weights = None
    tok, digest = _tokenizer_and_digest(cfg.model)
    ds = sources.read(specs, weights, num_cpus=min(cpus, 0.25))
    if split is not None:
        frac, seed = cfg.data.eval_fraction, cfg.seed
        want_eval = split == "eval"
        ds = ds.filter(lambda r: in_eval_split(r["source"], r["row"], seed, frac) == want_eval)
    ds = ds.map_batches(
        _tokenize_task,  # the ref is wrapped in a list so that Ray passes it on instead of resolving it per task
        fn_kwargs={"tok_ref": [ray.put(tok)], "tok_digest": digest, "data_cfg": cfg.data.model_dump()},
        batch_size=256,
        num_cpus=cpus,
    )
    if weights is not None and any(w != 1.0 for w in weights):
        ds = ds.map_batches(mix, fn_kwargs={"seed": cfg.seed}, batch_format="pyarrow", num_cpus=cpus)
    return ds


def mix(batch, seed: int):
    """Repeat or subsample good rows by their source's weight; bad and dropped rows stay, once, to be counted.
    Each repeat carries its ``copy`` number, so that the global order spreads the copies of a row apart.
    On Arrow tables, so that the token columns keep their list type."""
    import pyarrow as pa

    from sft_ray.sources import copies

    cols = {k: batch.column(k).to_pylist() for k in ("error", "dropped", "weight", "source", "row")}
    reps = [1 if cols["error"][i] or cols["dropped"][i]
            else copies(float(cols["weight"][i]), str(cols["source"][i]), int(cols["row"][i]), seed)
            for i in range(batch.num_rows)]
    out = batch.take(pa.array(np.repeat(np.arange(len(reps)), reps), pa.int64()))
    copy = np.concatenate([np.arange(r) for r in reps]).astype(np.int64) if reps else np.zeros(0, np.int64)
    return out.append_column("copy", pa.array(copy, pa.int64()))


def splits(train_specs: list[str], eval_specs: list[str], cfg, num_cpus: float | None = None):
    """Tokenized (train, eval) datasets: eval files, else the ``eval_fraction`` held out of train, else None."""
    w = cfg.data.train_weights()
    if eval_specs:
        return tokenized(train_specs, cfg, weights=w, num_cpus=num_cpus), tokenized(eval_specs, cfg)
    if cfg.data.eval_fraction > 0:
        return (tokenized(train_specs, cfg, "train", weights=w, num_cpus=num_cpus),
                tokenized(train_specs, cfg, "eval"))
    return tokenized(train_specs, cfg, weights=w, num_cpus=num_cpus), None


def order_key(seed: int, file: int, row: int, copy: int) -> int:
    """A row's place in the seeded global order: a 63-bit hash of (seed, file's place in the listing, row, copy),
    so the same data gets the same order wherever it is stored."""
    h = hashlib.blake2b(f"{seed}\0{file}\0{row}\0{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def trainable(ds, on_bad_rows: str, num_cpus: float = 0.5, with_ids: bool = False, order_seed: int | None = None):
    """Only the columns the trainer needs; under on_bad_rows=error a bad row stops the stream.

    ``num_cpus`` should equal ``data.tokenize_cpus``: Ray Data then fuses this step into the tokenizer task.
    ``with_ids`` adds ``example_id`` ("file:row", "#copy" for repeats) for tracing which examples each step
    trained on; ``order_seed`` adds the ``order`` key of the seeded global order (see ``global_order``)."""

    def keep(batch):
        """On Arrow tables: the token columns pass through without being converted to Python or NumPy."""
        import pyarrow as pa
        import pyarrow.compute as pc

        errors = batch.column("error")
        bad = pc.not_equal(errors, "")
        if pc.any(bad).as_py():
            for i in np.flatnonzero(bad.to_numpy(zero_copy_only=False)):
                msg = f"{where(batch['source'][i].as_py(), batch['row'][i].as_py())}: {errors[i].as_py()}"
                if on_bad_rows == "error":
                    raise DataError(msg)
                log.warning("skipping bad row %s", msg)
        good = batch.filter(pc.and_(pc.equal(errors, ""), pc.equal(batch.column("dropped"), "")))
        ints = pa.list_(pa.int64())  # a block of only bad rows has empty lists, typed null: one type for all blocks
        cols: dict[str, Any] = {"input_ids": good.column("input_ids").cast(ints), "labels": good.column("labels").cast(ints)}
        if with_ids or order_seed is not None:
            sources, rows = good.column("source").to_pylist(), good.column("row").to_pylist()
            copies = good.column("copy").to_pylist() if "copy" in good.column_names else [0] * len(rows)
            if with_ids:
                cols["example_id"] = [f"{s}:{r}" + (f"#{c}" if c else "") for s, r, c in zip(sources, rows, copies)]
            if order_seed is not None:
                cols["order"] = pa.array([order_key(order_seed, f, r, c) for f, r, c in
                                          zip(good.column("file").to_pylist(), rows, copies)], pa.int64())
        return pa.table(cols)

    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=num_cpus)


SORT_IN_DRIVER_BYTES = 64 << 20  # tokenized data up to this size is put in its global order by the driver


def global_order(ds, nbytes: int | None = None):
    """The rows sorted by their seeded ``order`` key: a global permutation that is the same on every attempt
    (so a resumed run skips exactly what it trained) and spreads every source, and every copy of a weighted
    row, through the epoch in proportion to its share.

    ``nbytes``: the data's size where known. Up to ``SORT_IN_DRIVER_BYTES`` the driver sorts it, in the same
    order (the keys are unique 63-bit hashes): Ray Data's distributed sort starts its shuffle tasks in fresh
    worker processes, ~4.5 s on a new 2-core cluster, which is most of a small run's data preparation."""
    if nbytes is not None and nbytes <= SORT_IN_DRIVER_BYTES:
        import pyarrow as pa
        import ray

        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        if tables:
            return ray.data.from_arrow(pa.concat_tables(tables).sort_by("order").drop_columns(["order"]))
    return ds.sort("order").drop_columns(["order"])


@dataclass
class DataStats:
    rows: int = 0
    bad: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_len: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)
    length_counts: dict[int, int] = field(default_factory=dict)  # exact row length -> rows
    rows_by_source: dict[str, int] = field(default_factory=dict)  # usable rows per file
    digest: str = ""  # of every usable row's tokens and labels, order-independent
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        p = self.length_percentiles
        return (f"{self.rows} rows, {self.tokens} tokens ({self.trained_tokens} trained), bad {self.bad}, "
                f"dropped as too long {self.dropped_too_long}, truncated {self.truncated}, "
                f"length p50/p90/p99/max {p.get('p50', 0)}/{p.get('p90', 0)}/{p.get('p99', 0)}/{self.max_len}")

    def to_dict(self) -> dict:
        return asdict(self)

    def lengths(self) -> np.ndarray:
        return np.repeat(np.fromiter(self.length_counts, dtype=np.int64),
                         np.fromiter(self.length_counts.values(), dtype=np.int64))


def _row_hash(ids, labels) -> int:
    h = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8)
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def _batch_stats(batch: dict[str, np.ndarray]) -> dict[str, list]:
    err = batch["error"].astype(str)
    dropped = batch["dropped"].astype(str)
    ok = (err == "") & (dropped == "")
    lengths = batch["n_tokens"][ok].astype(np.int64)
    values, counts = np.unique(lengths, return_counts=True)
    sources, per_source = np.unique(batch["source"][ok].astype(str), return_counts=True)
    digest = sum(_row_hash(batch["input_ids"][i], batch["labels"][i]) for i in np.flatnonzero(ok)) % (1 << 64)
    errors = [f"{where(s, r)}: {e}" for s, r, e in zip(batch["source"][~ok], batch["row"][~ok], err[~ok]) if e]
    return {
        "rows": [int(ok.sum())],
        "bad": [int((err != "").sum())],
        "dropped_too_long": [int(((dropped != "") & (err == "")).sum())],
        "truncated": [int(batch["truncated"][ok].sum())],
        "tokens": [int(lengths.sum())],
        "trained_tokens": [int(batch["n_trained"][ok].sum())],
        "max_len": [int(lengths.max()) if len(lengths) else 0],
        "lengths": [json.dumps({int(v): int(c) for v, c in zip(values, counts)})],
        "sources": [json.dumps({str(s): int(c) for s, c in zip(sources, per_source)})],
        "digest": [str(digest)],
        "errors": [json.dumps(errors[:MAX_ERRORS_SHOWN])],
    }


def percentiles(counts: dict[int, int], qs=(50, 90, 99)) -> dict[str, int]:
    """Exact percentiles (nearest rank) of a length distribution given as {length: rows}."""
    if not counts:
        return {}
    lengths = sorted(counts)
    cum = np.cumsum([counts[x] for x in lengths])
    total = cum[-1]
    return {f"p{q}": int(lengths[int(np.searchsorted(cum, math.ceil(q / 100 * total)))]) for q in qs}


def validate(ds, name: str, num_cpus: float = 0.25) -> DataStats:
    """One parallel pass over the tokenized rows; only small per-batch stats reach the driver."""
    st = DataStats()
    digest = 0
    for b in ds.map_batches(_batch_stats, batch_format="numpy", batch_size=512, num_cpus=num_cpus).iter_rows():
        for k in ("rows", "bad", "dropped_too_long", "truncated", "tokens", "trained_tokens"):
            setattr(st, k, getattr(st, k) + int(b[k]))
        st.max_len = max(st.max_len, int(b["max_len"]))
        for length, c in json.loads(b["lengths"]).items():
            st.length_counts[int(length)] = st.length_counts.get(int(length), 0) + c
        for source, c in json.loads(b["sources"]).items():
            st.rows_by_source[source] = st.rows_by_source.get(source, 0) + c
        digest = (digest + int(b["digest"])) % (1 << 64)
        if len(st.errors) < MAX_ERRORS_SHOWN:
            st.errors += json.loads(b["errors"])[: MAX_ERRORS_SHOWN - len(st.errors)]
    st.length_counts = dict(sorted(st.length_counts.items()))
    st.length_percentiles = percentiles(st.length_counts)
    st.digest = f"{digest:016x}"
    log.info("%s data: %s", name, st.summary())
    return st


def write_rejects(ds, path: Path) -> None:
    """Every bad row with its reason, as JSONL (Ray Data writes it in parallel)."""
    bad = ds.filter(lambda r: bool(r["error"])).select_columns(["source", "row", "error", "record"])
    bad.write_json(str(path.resolve()))


def check(stats: DataStats, name: str, on_bad_rows: str, specs: list[str] | None = None) -> None:
    """Stop on bad rows (unless skipped) and on data with no usable rows, naming the files."""
    if stats.bad and on_bad_rows == "error":
        shown = "\n  ".join(stats.errors)
        more = f"\n  ... and {stats.bad - len(stats.errors)} more" if stats.bad > len(stats.errors) else ""
        raise DataError(
            f"{stats.bad} bad row(s) in the {name} data; fix them or set data.on_bad_rows=skip:\n  {shown}{more}"
        )
    if stats.rows == 0:
        files = _files(specs or [])
        named = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        raise DataError(f"the {name} data has no usable rows: {named or ', '.join(specs or [])} ({stats.summary()})")


def empty_files(stats: DataStats, specs: list[str]) -> list[str]:
    """Files named by ``specs`` that gave no usable row (worth a warning when others did)."""
    return [f for f in _files(specs) if not stats.rows_by_source.get(f)]


def _files(specs: list[str]) -> list[str]:
    from sft_ray import sources

    out: list[str] = []
    for spec in specs:
        try:
            out += [spec] if spec.startswith("hf:") else sources.expand_any(spec)
        except sources.SourceError:
            out.append(spec)
    return out


def pad_collate(batch: dict[str, Any], pad_id: int, multiple: int = 8) -> dict[str, Any]:
    """Right-pad a batch of ragged rows; padding gets label -100 and attention 0."""
    import torch

    ids_list, lab_list = batch["input_ids"], batch["labels"]
    n = len(ids_list)
    longest = max(len(x) for x in ids_list)
    width = int(math.ceil(longest / multiple) * multiple)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_list, lab_list)):
        L = len(ids)
        input_ids[i, :L] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[i, :L] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
        attn[i, :L] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attn}
    if "example_id" in batch:
        out["example_id"] = [str(x) for x in batch["example_id"]]
    return out
