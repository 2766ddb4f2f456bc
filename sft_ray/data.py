"""The Ray Data pipeline: read -> parse -> normalise -> chat template -> tokenize -> loss mask.

Tokenization happens here, in parallel Ray tasks, and the trainers receive rows that are already
``input_ids`` + ``labels``; TRL's own dataset preparation (which calls ``.map``) is skipped. A
validation pass (parallel, streaming) checks every row and counts rows and tokens before training,
which is what sets ``max_steps`` for a stream that has no length.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_ray.formats import RowError, to_example
from sft_ray.template import IGNORE_INDEX, TooLong, tokenize_example

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 20


class DataError(ValueError):
    pass


def where(source: str, row: int) -> str:
    unit = "line" if source.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".json")) else "row"
    return f"{source} {unit} {row}" if row else source


_DRIVER_TOKENIZERS: dict[str, Any] = {}  # model config JSON -> tokenizer, in the process that builds the pipeline
_TASK_TOKENIZER: dict[str, Any] = {}  # object ref hex -> tokenizer, in a Ray Data worker process (one at a time)


def _tokenizer(model_cfg) -> Any:
    """The driver's tokenizer for ``model_cfg``, loaded once per process."""
    from sft_ray.modeling import load_tokenizer

    key = model_cfg.model_dump_json()
    if key not in _DRIVER_TOKENIZERS:
        _DRIVER_TOKENIZERS[key] = load_tokenizer(model_cfg)
    return _DRIVER_TOKENIZERS[key]


def _tokenize_task(batch: dict[str, np.ndarray], tok_ref: list, data_cfg: dict) -> dict[str, list]:
    """Ray Data task. The tokenizer arrives pickled through the object store and is kept per worker process:
    unpickling takes ~1 s and no torch, where loading it with transformers' Auto classes takes ~6 s of
    imports in every fresh process."""
    import ray

    from sft_ray.config import DataConfig

    key = tok_ref[0].hex()
    if key not in _TASK_TOKENIZER:
        _TASK_TOKENIZER.clear()
        _TASK_TOKENIZER[key] = ray.get(tok_ref[0])
    return tokenize_batch(batch, _TASK_TOKENIZER[key], DataConfig.model_validate(data_cfg))


def tokenize_batch(batch: dict[str, Any], tok, data) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in ("source", "row", "input_ids", "labels", "n_tokens", "n_trained",
                                            "truncated", "dropped", "error", "record", "weight")}
    weights = batch.get("weight", [1.0] * len(batch["row"]))
    for source, row, record, error, weight in zip(batch["source"], batch["row"], batch["record"], batch["error"],
                                                  weights):
        ids: list[int] = []
        labels: list[int] = []
        n_tok = n_tr = 0
        truncated = False
        dropped = ""
        if not error:
            try:
                obj = json.loads(record)
                if not isinstance(obj, dict):
                    raise RowError(f"a record must be a JSON object, got {type(obj).__name__}")
                ex = to_example(obj, data.format, data.columns)
                t = tokenize_example(ex, tok, data.max_length, data.loss_on, data.too_long, data.template_kwargs)
                ids, labels, n_tok, n_tr, truncated = (t["input_ids"], t["labels"], t["n_tokens"], t["n_trained"],
                                                       t["truncated"])
            except json.JSONDecodeError as e:
                error = f"JSON does not parse: {e.msg} (column {e.colno})"
            except RowError as e:
                error = str(e)
            except TooLong as e:
                dropped = str(e)
        out["source"].append(str(source))
        out["row"].append(int(row))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_tokens"].append(n_tok)
        out["n_trained"].append(n_tr)
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)
        out["error"].append(str(error))
        out["record"].append(str(record)[:2000] if error else "")
        out["weight"].append(float(weight))
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


def tokenized(specs: list[str], cfg, split: str | None = None, weights: list[float] | None = None):
    """Dataset of tokenized rows (bad and dropped rows still present, flagged) for ``specs``.

    ``weights`` (train data only) repeat or subsample each spec's rows; the eval split is never reweighted."""
    import ray

    from sft_ray import sources

    quiet_ray_data()
    if split == "eval":
        weights = None
    ds = sources.read(specs, weights)
    if split is not None:
        frac, seed = cfg.data.eval_fraction, cfg.seed
        want_eval = split == "eval"
        ds = ds.filter(lambda r: in_eval_split(r["source"], r["row"], seed, frac) == want_eval)
    ds = ds.map_batches(
        _tokenize_task,  # the ref is wrapped in a list so that Ray passes it on instead of resolving it per task
        fn_kwargs={"tok_ref": [ray.put(_tokenizer(cfg.model))], "data_cfg": cfg.data.model_dump()},
        batch_size=256,
        num_cpus=cfg.data.tokenize_cpus,
    )
    if weights is not None and any(w != 1.0 for w in weights):
        ds = ds.map_batches(mix, fn_kwargs={"seed": cfg.seed}, batch_format="numpy", num_cpus=cfg.data.tokenize_cpus)
    return ds


def mix(batch: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """Repeat or subsample good rows by their source's weight; bad and dropped rows stay, once, to be counted."""
    from sft_ray.sources import copies

    reps = [1 if batch["error"][i] or batch["dropped"][i]
            else copies(float(batch["weight"][i]), str(batch["source"][i]), int(batch["row"][i]), seed)
            for i in range(len(batch["row"]))]
    idx = np.repeat(np.arange(len(reps)), reps)
    return {k: v[idx] for k, v in batch.items()}


def splits(train_specs: list[str], eval_specs: list[str], cfg):
    """Tokenized (train, eval) datasets: eval files, else the ``eval_fraction`` held out of train, else None."""
    w = cfg.data.train_weights()
    if eval_specs:
        return tokenized(train_specs, cfg, weights=w), tokenized(eval_specs, cfg)
    if cfg.data.eval_fraction > 0:
        return tokenized(train_specs, cfg, "train", weights=w), tokenized(train_specs, cfg, "eval")
    return tokenized(train_specs, cfg, weights=w), None


def trainable(ds, on_bad_rows: str, num_cpus: float = 0.5, with_ids: bool = False):
    """Only the columns the trainer needs; under on_bad_rows=error a bad row stops the stream.

    ``num_cpus`` should equal ``data.tokenize_cpus``: Ray Data then fuses this step into the tokenizer task.
    ``with_ids`` adds ``example_id`` ("file:row") for tracing which examples each step trained on."""

    def keep(batch: dict[str, np.ndarray]) -> dict[str, list]:
        ids, labels, keys = [], [], []
        for i in range(len(batch["error"])):
            if batch["error"][i]:
                msg = f"{where(batch['source'][i], batch['row'][i])}: {batch['error'][i]}"
                if on_bad_rows == "error":
                    raise DataError(msg)
                log.warning("skipping bad row %s", msg)
                continue
            if batch["dropped"][i]:
                continue
            ids.append(batch["input_ids"][i].tolist())
            labels.append(batch["labels"][i].tolist())
            keys.append(f"{batch['source'][i]}:{batch['row'][i]}")
        return {"input_ids": ids, "labels": labels, **({"example_id": keys} if with_ids else {})}

    return ds.map_batches(keep, batch_format="numpy", num_cpus=num_cpus)


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
    length_hist: list[int] = field(default_factory=list)  # rows per 8-token bucket: [0, 8), [8, 16), ...
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        p = self.length_percentiles
        return (f"{self.rows} rows, {self.tokens} tokens ({self.trained_tokens} trained), bad {self.bad}, "
                f"dropped as too long {self.dropped_too_long}, truncated {self.truncated}, "
                f"length p50/p90/p99/max {p.get('p50', 0)}/{p.get('p90', 0)}/{p.get('p99', 0)}/{self.max_len}")

    def to_dict(self) -> dict:
        return asdict(self)


def _batch_stats(batch: dict[str, np.ndarray]) -> dict[str, list]:
    err = batch["error"].astype(str)
    dropped = batch["dropped"].astype(str)
    ok = (err == "") & (dropped == "")
    lengths = batch["n_tokens"][ok].astype(np.int64)
    hist = np.bincount(np.minimum(lengths // 8, 4095), minlength=4096)
    errors = [f"{where(s, r)}: {e}" for s, r, e in zip(batch["source"][~ok], batch["row"][~ok], err[~ok]) if e]
    return {
        "rows": [int(ok.sum())],
        "bad": [int((err != "").sum())],
        "dropped_too_long": [int(((dropped != "") & (err == "")).sum())],
        "truncated": [int(batch["truncated"][ok].sum())],
        "tokens": [int(lengths.sum())],
        "trained_tokens": [int(batch["n_trained"][ok].sum())],
        "max_len": [int(lengths.max()) if len(lengths) else 0],
        "hist": [hist.tolist()],
        "errors": [json.dumps(errors[:MAX_ERRORS_SHOWN])],
    }


def validate(ds, name: str) -> DataStats:
    """One parallel, streaming pass over the tokenized rows; only small per-batch stats reach the driver."""
    st = DataStats()
    hist = np.zeros(4096, dtype=np.int64)
    for b in ds.map_batches(_batch_stats, batch_format="numpy", batch_size=512, num_cpus=0.25).iter_rows():
        for k in ("rows", "bad", "dropped_too_long", "truncated", "tokens", "trained_tokens"):
            setattr(st, k, getattr(st, k) + int(b[k]))
        st.max_len = max(st.max_len, int(b["max_len"]))
        hist += np.asarray(b["hist"], dtype=np.int64)
        if len(st.errors) < MAX_ERRORS_SHOWN:
            st.errors += json.loads(b["errors"])[: MAX_ERRORS_SHOWN - len(st.errors)]
    if hist.sum():
        cdf = np.cumsum(hist) / hist.sum()
        st.length_percentiles = {f"p{q}": int((np.searchsorted(cdf, q / 100) + 1) * 8) for q in (50, 90, 99)}
        st.length_hist = np.trim_zeros(hist, "b").tolist()
    log.info("%s data: %s", name, st.summary())
    return st


def write_rejects(ds, path: Path) -> None:
    """Every bad row with its reason, as JSONL (Ray Data writes it in parallel)."""
    bad = ds.filter(lambda r: bool(r["error"])).select_columns(["source", "row", "error", "record"])
    bad.write_json(str(path.resolve()))


def check(stats: DataStats, name: str, on_bad_rows: str) -> None:
    if stats.bad and on_bad_rows == "error":
        shown = "\n  ".join(stats.errors)
        more = f"\n  ... and {stats.bad - len(stats.errors)} more" if stats.bad > len(stats.errors) else ""
        raise DataError(
            f"{stats.bad} bad row(s) in the {name} data; fix them or set data.on_bad_rows=skip:\n  {shown}{more}"
        )
    if stats.rows == 0:
        raise DataError(f"the {name} data has no usable rows ({stats.summary()})")


def pad_collate(batch: dict[str, np.ndarray], pad_id: int, multiple: int = 8) -> dict[str, Any]:
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


def steps_per_epoch(rows: int, num_workers: int, batch_size: int, grad_accum: int,
                    bins_per_row: float | None = None) -> tuple[int, int]:
    """Optimizer steps per epoch and rows per worker (Ray's equal split gives each worker rows // workers).
    With packing, a batch holds ``batch_size`` bins and a row fills ``bins_per_row`` of a bin."""
    per_worker = rows // num_workers
    units = math.ceil(per_worker * bins_per_row) if bins_per_row is not None else per_worker
    batches = math.ceil(units / batch_size)
    return batches // grad_accum, per_worker


def lengths_from_hist(hist: list[int], max_length: int) -> np.ndarray:
    """Row lengths (bucket midpoints) recreated from the validation pass's 8-token histogram."""
    counts = np.asarray(hist, dtype=np.int64)
    mids = np.minimum(np.arange(len(counts)) * 8 + 4, max_length)
    return np.repeat(mids, counts)
