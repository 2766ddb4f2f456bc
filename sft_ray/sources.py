"""Find dataset files and read them into Ray Data rows that remember where they came from.

Each row is ``{"source": file, "row": line-or-row number (1-based), "record": JSON text or "",
"error": reason or ""}``. Keeping the raw record as JSON text (not Arrow structs) means rows with
different nested shapes never fail schema unification, and every later error can name file and row.
Reading runs as Ray tasks, one file per task, streamed in batches: no file passes through the driver.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from typing import Any, Iterator

import pyarrow.fs as pafs

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
BATCH_ROWS = 1024


class SourceError(ValueError):
    pass


def _kind(path: str) -> str | None:
    """File type by extension; ``.arrow`` only inside a saved dataset (read via its folder)."""
    for ext, kind in EXTENSIONS.items():
        if path.endswith(ext) or path.endswith(ext + ".gz"):
            return kind
    return None


def _is_hf_saved(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def expand(spec: str) -> list[str]:
    """Files named by a path, directory, glob or URI (``file://``, ``s3://``, ``gs://``)."""
    if "://" in spec:
        fs, root = pafs.FileSystem.from_uri(spec)
        scheme = spec.split("://", 1)[0]
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{spec}: not found")
        if info.type == pafs.FileType.File:
            paths = [root]
        else:
            sel = pafs.FileSelector(root, recursive=True)
            paths = sorted(i.path for i in fs.get_file_info(sel)
                           if i.type == pafs.FileType.File and _kind(i.path) not in (None, "arrow"))
        prefix = "file://" if scheme == "file" else f"{scheme}://"
        files = [prefix + p if not p.startswith("/") or scheme != "file" else "file://" + p for p in paths]
    elif any(c in spec for c in "*?["):
        files = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        files = []
        for d, dirs, names in os.walk(spec):
            dirs.sort()
            if _is_hf_saved(d):  # a saved dataset inside the folder: its shards, not its metadata JSON
                files += _saved_dataset_files(d)
                dirs.clear()
                continue
            files += sorted(os.path.join(d, f) for f in names if _kind(f) not in (None, "arrow") and f[0] != ".")
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise SourceError(f"{spec}: no such file or directory")
    if not files:
        raise SourceError(f"{spec}: no dataset files found (looked for {', '.join(EXTENSIONS)})")
    unknown = [f for f in files if _kind(f) is None]
    if unknown:
        raise SourceError(f"{unknown[0]}: unknown file type (supported: {', '.join(EXTENSIONS)})")
    return [os.path.abspath(f) if "://" not in f else f for f in files]


def _open(path: str, seekable: bool = False):
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
    else:
        fs, p = pafs.LocalFileSystem(), path
    if seekable:  # Parquet reads its footer first
        return fs.open_input_file(p)
    compression = "gzip" if path.endswith(".gz") else None
    return fs.open_input_stream(p, compression=compression)


def _row(source: str, n: int, record: str = "", error: str = "") -> dict[str, Any]:
    return {"source": source, "row": n, "record": record, "error": error}


def iter_file(path: str) -> Iterator[dict[str, Any]]:
    """Yield one provenance row per record of a file; unreadable records become error rows."""
    kind = _kind(path)
    if kind in ("jsonl", "json"):
        with _open(path) as f:
            data = f.read()
        head = data.lstrip()[:1]
        if kind == "json" and head == b"[":
            try:
                items = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield _row(path, 1, error=f"not UTF-8 text (byte {e.start})")
                return
            except json.JSONDecodeError as e:
                yield _row(path, e.lineno, error=f"JSON array does not parse: {e.msg} (line {e.lineno} col {e.colno})")
                return
            for i, item in enumerate(items, 1):
                yield _row(path, i, json.dumps(item, ensure_ascii=False))
            return
        for n, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue  # blank lines (e.g. the one after the last record) are not records
            try:
                yield _row(path, n, raw.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError as e:
                yield _row(path, n, error=f"not UTF-8 text (byte {e.start} of the line)")
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        with _open(path, seekable=True) as f:
            pf = pq.ParquetFile(f)
            n = 0
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                for item in batch.to_pylist():
                    n += 1
                    yield _row(path, n, json.dumps(item, ensure_ascii=False, default=str))
        return
    if kind == "arrow":  # the shards of a `datasets` save_to_disk folder (Arrow IPC stream)
        import pyarrow as pa

        with _open(path) as f:
            n = 0
            for batch in pa.ipc.open_stream(f):
                for item in batch.to_pylist():
                    n += 1
                    yield _row(path, n, json.dumps(item, ensure_ascii=False, default=str))
        return
    if kind == "csv":
        import pyarrow.csv as pcsv

        with _open(path) as f:
            reader = pcsv.open_csv(f)
            n = 0
            for batch in reader:
                for item in batch.to_pylist():
                    n += 1
                    yield _row(path, n + 1, json.dumps(item, ensure_ascii=False, default=str))  # +1: header line
        return
    raise SourceError(f"{path}: unknown file type")


def copies(weight: float, source: str, row: int, seed: int) -> int:
    """How many times a row enters the mix: ``weight`` 2.5 = twice, and a third time for half the rows.

    Deterministic by (seed, file, row), so reruns and restarted workers see the same mix."""
    whole = int(weight)
    frac = weight - whole
    return whole + int(frac > 0 and zlib.crc32(f"mix:{seed}:{source}:{row}".encode()) % 100_000 < frac * 100_000)


def _read_files(batch: dict[str, Any]) -> Iterator[dict[str, list]]:
    """Ray Data ``map_batches`` generator: read the files of a batch, emit rows in chunks."""
    out: dict[str, list] = {"source": [], "row": [], "record": [], "error": [], "weight": []}
    for path, weight in zip(batch["path"], batch["weight"]):
        try:
            for r in iter_file(str(path)):
                for k in ("source", "row", "record", "error"):
                    out[k].append(r[k])
                out["weight"].append(float(weight))
                if len(out["row"]) >= BATCH_ROWS:
                    yield out
                    out = {k: [] for k in out}
        except Exception as e:  # a file that cannot be opened at all is one error row
            for k, v in _row(str(path), 0, error=f"cannot read file: {e}").items():
                out[k].append(v)
            out["weight"].append(float(weight))
    if out["row"]:
        yield out


def _saved_dataset_files(path: str) -> list[str]:
    """The Arrow shards of a ``save_to_disk`` folder (its ``train`` split for a DatasetDict)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        if not splits:
            raise SourceError(f"{path}: dataset_dict.json lists no splits")
        path = os.path.join(path, "train" if "train" in splits else splits[0])
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        raise SourceError(f"{path}: not a `datasets` save_to_disk folder (no state.json)")
    with open(state) as f:
        names = [d["filename"] for d in json.load(f).get("_data_files", [])]
    if not names:
        raise SourceError(f"{path}: the saved dataset has no data files")
    return [os.path.abspath(os.path.join(path, n)) for n in names]


def read(specs: list[str], weights: list[float] | None = None):
    """A Ray Dataset of provenance rows for all files named by ``specs`` (HF datasets too).

    Each row carries the ``weight`` of its spec (default 1); the mix is applied after parsing, so that a
    bad row is reported whatever its weight (see ``data.mix``)."""
    import ray

    weights = list(weights) if weights is not None else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise SourceError(f"{len(weights)} weights for {len(specs)} data specs")
    listing: list[dict[str, Any]] = []
    hub: list[tuple[str, float]] = []
    for spec, w in zip(specs, weights):
        if spec.startswith("hf:"):
            hub.append((spec, w))
        elif _is_hf_saved(spec):
            listing += [{"path": f, "weight": w} for f in _saved_dataset_files(spec)]
        else:
            listing += [{"path": f, "weight": w} for f in expand(spec)]
    parts = []
    if listing:
        files = ray.data.from_items(listing, override_num_blocks=max(1, len(listing)))
        parts.append(files.map_batches(_read_files, batch_size=1, num_cpus=0.25))
    for spec, w in hub:
        parts.append(_read_hub(spec, w))
    ds = parts[0]
    for p in parts[1:]:
        ds = ds.union(p)
    return ds


def _read_hub(spec: str, weight: float):
    """``hf:org/name[:split]`` streamed from the Hugging Face Hub through ``datasets`` (needs network)."""
    import datasets
    import ray

    name, _, split = spec[3:].partition(":")
    d = datasets.load_dataset(name, split=split or "train", streaming=True)
    d = d.map(lambda ex, i: {"__row": i + 1}, with_indices=True)  # lazy: numbers rows for error messages
    ds = ray.data.from_huggingface(d)

    def to_rows(batch: dict[str, Any]) -> dict[str, list]:
        keys = [k for k in batch if k != "__row"]
        n = len(batch["__row"])
        records = [json.dumps({k: _plain(batch[k][i]) for k in keys}, ensure_ascii=False, default=str)
                   for i in range(n)]
        return {"source": [spec] * n, "row": [int(r) for r in batch["__row"]], "record": records,
                "error": [""] * n, "weight": [weight] * n}

    return ds.map_batches(to_rows, batch_format="numpy", num_cpus=0.5)


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return _plain(v.tolist())
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
