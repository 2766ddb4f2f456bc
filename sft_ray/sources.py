"""Find dataset files and read them into Ray Data rows that remember where they came from.

Each row is ``{"source": file, "row": line-or-row number (1-based), "record": JSON text or "",
"error": reason or ""}``. Keeping the raw record as JSON text (not Arrow structs) means rows with
different nested shapes never fail schema unification, and every later error can name file and row.
Reading runs as Ray tasks, one file per task, streamed in batches: no file passes through the driver.
"""

from __future__ import annotations

import glob
import json
import math
import os
import zlib
from typing import Any, Iterator

import pyarrow.fs as pafs

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
BATCH_ROWS = 1024


class SourceError(ValueError):
    pass


OTHER_COMPRESSION = (".zst", ".zstd", ".bz2", ".xz", ".lz4", ".zip", ".7z")  # not read: refused by name


def shown_uri(uri: str) -> str:
    """A URI as logs, errors and model cards may show it: scheme, host and path, without the user info or the
    query, where credentials and signed-URL secrets travel (``s3://b/p?access_key=...&secret_key=...``)."""
    if "://" not in uri:
        return uri
    from urllib.parse import urlsplit

    u = urlsplit(uri)
    return f"{u.scheme}://{u.hostname or ''}{u.path}"


def shown_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A dumped config as summaries and reports show it: the model and data URIs through ``shown_uri``
    (``config.yaml`` keeps them whole: ``sft-ray eval RUN_DIR`` reads the data again from it)."""
    out = {**cfg, "model": {**cfg.get("model", {})}, "data": {**cfg.get("data", {})}}
    if isinstance(out["model"].get("name"), str):
        out["model"]["name"] = shown_uri(out["model"]["name"])
    for key in ("train", "eval"):
        if isinstance(out["data"].get(key), list):
            out["data"][key] = [shown_uri(s) if isinstance(s, str) else s for s in out["data"][key]]
    return out


def _kind(path: str) -> str | None:
    """File type by extension (any case: ``DATA.JSONL`` too); ``.arrow`` only inside a saved dataset (read via
    its folder)."""
    low = path.lower()
    for ext, kind in EXTENSIONS.items():
        if low.endswith(ext) or low.endswith(ext + ".gz"):
            return kind
    return None


def _unread_compression(name: str) -> bool:
    """A data file compressed some way other than gzip (``train.jsonl.zst``): in a folder it is refused by name
    instead of being passed over like a README."""
    low = name.lower()
    return any(low.endswith(ext + c) for ext in EXTENSIONS for c in OTHER_COMPRESSION)


def _refuse_unread_compression(paths) -> None:
    odd = [p for p in paths if _unread_compression(p)]
    if odd:
        raise SourceError(f"{odd[0]}: compressed in a way sft-ray does not read (gzip only: .jsonl.gz, .json.gz, "
                          ".csv.gz); decompress it or gzip it")


def _is_hf_saved(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def expand(spec: str) -> list[str]:
    """Files named by a path, directory, glob or URI (``file://``, ``s3://``, ``gs://``)."""
    if "://" in spec:
        try:
            files = _expand_uri(spec)
        except SourceError:
            raise
        except (OSError, ValueError) as e:  # no such bucket, credentials refused, endpoint unreachable, ...
            raise SourceError(f"{spec}: cannot list it: {e}") from None
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
            _refuse_unread_compression(os.path.join(d, f) for f in sorted(names))
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


def _expand_uri(spec: str) -> list[str]:
    """The files under a URI: one file, everything below a prefix, or a glob's matches (``*`` and ``?`` within
    a path segment, ``**`` across segments), listed through pyarrow (credentials and endpoint from the
    environment, e.g. AWS_ENDPOINT_URL for an S3-compatible server)."""
    scheme, rest = spec.split("://", 1)
    magic = [rest.find(c) for c in "*?[" if c in rest]
    base = rest if not magic else rest[:min(magic)].rsplit("/", 1)[0]
    fs, root = pafs.FileSystem.from_uri(f"{scheme}://{base}")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        bucket = root.split("/", 1)[0]
        if scheme != "file" and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise SourceError(f"{spec}: not found: there is no bucket {bucket!r} at this endpoint (or these "
                              "credentials may not see it)")
        raise SourceError(f"{spec}: not found" + (f" (nothing under {scheme}://{base})" if magic else ""))
    if info.type == pafs.FileType.File and not magic:
        paths = [root]
    else:
        listed = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if i.type == pafs.FileType.File]
        if magic:  # match against the pattern as pyarrow names paths (no scheme; bucket first for S3)
            pattern = _glob_regex(root + rest[len(base):])
            listed = [p for p in listed if pattern.match(p)]
        _refuse_unread_compression(f"{scheme}://{p}" for p in sorted(listed))  # as in a folder: never passed over
        paths = sorted(p for p in listed if _kind(p) not in (None, "arrow"))
    if scheme == "file":
        return ["file://" + p for p in paths]
    return [f"{scheme}://{p}" for p in paths]


def _glob_regex(pattern: str):
    """A glob as a regex over '/'-separated paths: ``*``/``?`` stay within a segment, ``**`` crosses them."""
    import re

    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            body = body.replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body[0] in "!^" else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _open(path: str, seekable: bool = False):
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
    else:
        fs, p = pafs.LocalFileSystem(), path
    if seekable:  # Parquet reads its footer first
        return fs.open_input_file(p)
    if path.lower().endswith(".gz"):
        # Python's gzip hands out what it has decompressed before it meets a cut-off end (the next read raises),
        # so a truncated file keeps every whole line before the cut; Arrow's stream would drop a whole chunk
        import gzip

        raw = fs.open_input_stream(p, compression=None)  # not Arrow's own detection: Python's gzip reads it
        g = gzip.GzipFile(fileobj=raw, mode="rb")
        g.myfileobj = raw  # closed with it
        return g
    return fs.open_input_stream(p, compression=None)


class _Prefixed:
    """A read() stream that first returns bytes already taken from it (to sniff a file's first bytes)."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        # read1: one read of the stream below (gzip: what it has decompressed so far), so that a file cut off
        # mid-chunk still gives the lines before the cut instead of losing the chunk with the error
        return (getattr(self.f, "read1", None) or self.f.read)(n)


def _row(source: str, n: int, record: str = "", error: str = "") -> dict[str, Any]:
    return {"source": source, "row": n, "record": record, "error": error}


def _lines(f, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a byte stream, read a chunk at a time (a large file is never held whole)."""
    rest = b""
    while True:
        data = f.read(chunk)
        if not data:
            break
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _json_array(f, path: str, chunk: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Rows of a file holding one JSON array, decoded item by item from a sliding buffer. Each row is numbered
    by the line its item starts on (as JSON Lines rows are). Whatever stops the reading (an item that does not
    parse, bytes that are not UTF-8, anything after the closing ``]``) ends the file with one error row that
    says so; the items before it are rows."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    dec = json.JSONDecoder()
    buf, pos, eof, item, read = "", 0, False, 0, 0
    line, counted = 1, 0  # the line at buf[counted]
    bad_byte: list[int] = []  # where the first byte that is not UTF-8 is, once met (reading stops there)

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += buf.count("\n", counted, p)
        counted = p
        return line

    def keep_from(p: int) -> None:
        nonlocal buf, pos, counted
        line_at(p)
        buf, pos, counted = buf[p:], 0, 0

    def more() -> bool:
        nonlocal buf, eof, read
        if eof:
            return False
        data = f.read(chunk)
        keep_from(pos)
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:  # keep the text before it; the items in it are still rows
            pending = len(e.object) - len(data)
            text = e.object[:e.start].decode("utf-8")
            bad_byte.append(read - pending + e.start)
            data = b""
        buf += text
        read += len(data)
        eof = not data
        return not eof

    def stopped(reason: str) -> ValueError:
        if bad_byte:
            reason = f"not UTF-8 text at byte {bad_byte[0]} of the file"
        return ValueError(f"{reason}; reading stopped after item {item} (the {item} items before it are kept "
                          "when data.on_bad_rows=skip)" if item else reason)

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    try:
        skip_ws()
        if buf[pos:pos + 1] == "\ufeff":
            pos += 1
            skip_ws()
        if buf[pos:pos + 1] != "[":
            raise stopped("a .json file must hold one JSON array of records (or one record per line)")
        pos += 1
        while True:
            skip_ws()
            if buf[pos:pos + 1] == "]":
                pos += 1
                skip_ws()
                if pos < len(buf) or bad_byte:
                    raise stopped(f"more data after the array's closing ']' (line {line_at(pos)}: "
                                  f"{buf[pos:pos + 20]!r}); one array per .json file")
                return
            if item and buf[pos:pos + 1] == ",":
                pos += 1
                skip_ws()
            elif item:
                raise stopped(f"expected ',' or ']' after item {item}")
            while True:
                try:
                    value, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if eof or not more():
                        raise stopped(f"item {item + 1} (line {line_at(pos)}) does not parse: {e.msg}") from None
            item += 1
            yield _row(path, line_at(pos), json.dumps(value, ensure_ascii=False))
            pos = end
            if pos > chunk:  # keep the buffer small
                keep_from(pos)
    except ValueError as e:
        yield _row(path, line_at(min(pos, len(buf))), error=f"JSON array: {e}")


def _record(item: dict[str, Any]) -> str:
    """A Parquet/Arrow/CSV row as JSON text. Binary values are text stored as bytes: decoded as UTF-8 (never
    written as their Python repr), and a value that is not UTF-8 makes the row bad."""
    def plain(v: Any) -> Any:
        if isinstance(v, (bytes, bytearray, memoryview)):
            try:
                return bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"a binary value is not UTF-8 text (byte {e.start})") from None
        return str(v)  # dates, decimals: as their text

    return json.dumps(item, ensure_ascii=False, default=plain)


def _rows(path: str, batches, first: int = 1) -> Iterator[dict[str, Any]]:
    """Provenance rows of record batches, numbered from ``first``."""
    n = first - 1
    for batch in batches:
        for item in batch.to_pylist():
            n += 1
            try:
                yield _row(path, n, _record(item))
            except ValueError as e:
                yield _row(path, n, error=str(e))


def iter_file(path: str) -> Iterator[dict[str, Any]]:
    """Yield one provenance row per record of a file; unreadable records become error rows.

    Every kind is read as a stream (JSON Lines line by line, a JSON array item by item, Parquet/Arrow/CSV
    batch by batch), so a file never has to fit in memory."""
    kind = _kind(path)
    if kind in ("jsonl", "json"):
        with _open(path) as f:
            head = f.read(4096)
            start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
            if kind == "json" and start == b"[":
                yield from _json_array(_Prefixed(head, f), path)
                return
            for n, raw in enumerate(_lines(_Prefixed(head, f)), 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows tools write one)
                    raw = raw[3:]
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
            yield from _rows(path, pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS))
        return
    if kind == "arrow":  # the shards of a `datasets` save_to_disk folder (Arrow IPC stream)
        import pyarrow as pa

        with _open(path) as f:
            yield from _rows(path, pa.ipc.open_stream(f))
        return
    if kind == "csv":
        import pyarrow as pa
        import pyarrow.csv as pcsv

        with _open(path) as f:  # the header's column names, then every column read as text
            names = pcsv.open_csv(f).schema.names
        # a CSV cell is text: "4", "true", "3.10", "NA" and "null" stay as written; only an empty, unquoted
        # cell is missing
        convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=[""],
                                      strings_can_be_null=True, quoted_strings_can_be_null=False)
        with _open(path) as f:
            yield from _rows(path, pcsv.open_csv(f, convert_options=convert), first=2)  # line 1: the header
        return
    raise SourceError(f"{path}: unknown file type")


def copies(weight: float, source: str, row: int, seed: int) -> int:
    """How many times a row enters the mix: ``weight`` 2.5 = twice, and a third time for half the rows.

    Deterministic by (seed, file, row), so reruns and restarted workers see the same mix."""
    whole = int(weight)
    frac = weight - whole
    return whole + int(frac > 0 and zlib.crc32(f"mix:{seed}:{source}:{row}".encode()) % 100_000 < frac * 100_000)


def _read_files(batch: dict[str, Any]) -> Iterator[dict[str, list]]:
    """Ray Data ``map_batches`` generator: read the files of a batch, emit rows in chunks.

    A file that fails part-way (truncated, corrupt) ends with one error row placed after the last row read,
    saying how many rows were read before it: under ``on_bad_rows=skip`` those rows are kept, and the
    error says so."""
    out: dict[str, list] = {"source": [], "row": [], "record": [], "error": [], "weight": [], "file": []}
    for path, weight, file in zip(batch["path"], batch["weight"], batch["file"]):
        n = last = 0
        try:
            for r in iter_file(str(path)):
                for k in ("source", "row", "record", "error"):
                    out[k].append(r[k])
                out["weight"].append(float(weight))
                out["file"].append(int(file))
                n, last = n + 1, r["row"]
                if len(out["row"]) >= BATCH_ROWS:
                    yield out
                    out = {k: [] for k in out}
        except Exception as e:
            if n == 0:  # nothing could be read at all
                msg = f"cannot read file: {e}"
            else:
                msg = (f"reading stopped after row {last}: {type(e).__name__}: {e} (the {n} rows read before "
                       "it are kept when data.on_bad_rows=skip)")
            for k, v in _row(str(path), last + 1 if n else 0, error=msg).items():
                out[k].append(v)
            out["weight"].append(float(weight))
            out["file"].append(int(file))
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


def expand_any(spec: str) -> list[str]:
    """The files of any local or URI spec, a ``save_to_disk`` folder included (``hf:`` specs are not files)."""
    return _saved_dataset_files(spec) if _is_hf_saved(spec) else expand(spec)


def read(specs: list[str], weights: list[float] | None = None, num_cpus: float = 0.25):
    """A Ray Dataset of provenance rows for all files named by ``specs`` (HF datasets too).

    Each row carries ``file``, its file's place in the listing of ``specs``: the same files named the same way
    get the same numbers wherever they are stored (the global order is seeded by it, not by the path).

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
        else:
            listing += [{"path": f, "weight": w, "file": len(listing) + i} for i, f in enumerate(expand_any(spec))]
    parts = []
    if listing:
        files = ray.data.from_items(listing, override_num_blocks=max(1, len(listing)))
        parts.append(files.map_batches(_read_files, batch_size=1, num_cpus=num_cpus, compute=_readers()))
    for i, (spec, w) in enumerate(hub):
        parts.append(_read_hub(spec, w, num_cpus, file=len(listing) + i))
    ds = parts[0]
    for p in parts[1:]:
        ds = ds.union(p)
    return ds


def _readers():
    """At most one file reader per 4 CPUs of the cluster: a reader yields ~50,000 rows/s, more than ten
    tokenizer tasks take, and every concurrent reader beyond the warmed worker processes is a fresh one that
    spends ~3 s of CPU importing Ray Data before its first row (on 2 cores, 2 of the first 11 s)."""
    import ray

    return ray.data.TaskPoolStrategy(size=max(1, math.ceil(ray.cluster_resources().get("CPU", 1) / 4)))


def _read_hub(spec: str, weight: float, num_cpus: float = 0.25, file: int = 0):
    """``hf:org/name[:split]`` streamed through ``datasets``: a Hub id (needs the network, or the datasets
    cache with HF_DATASETS_OFFLINE=1) or a local dataset repository folder (``hf:/path/to/repo:test``)."""
    import datasets
    import ray

    name, _, split = spec[3:].partition(":")
    try:
        d = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # no network, no such dataset or split: say which spec, and why
        raise SourceError(f"{spec}: cannot load it through `datasets`: {type(e).__name__}: {e}") from None
    d = d.map(lambda ex, i: {"__row": i + 1}, with_indices=True)  # lazy: numbers rows for error messages
    # Ray's datasource for a `datasets` stream, directly: `ray.data.from_huggingface` first asks the Hub for
    # the dataset's raw Parquet files (which fails offline, and would bypass the row numbering above)
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    ds = ray.data.read_datasource(HuggingFaceDatasource(dataset=d, batch_size=BATCH_ROWS))

    def to_rows(batch: dict[str, Any]) -> dict[str, list]:
        keys = [k for k in batch if k != "__row"]
        n = len(batch["__row"])
        records = [json.dumps({k: _plain(batch[k][i]) for k in keys}, ensure_ascii=False, default=str)
                   for i in range(n)]
        return {"source": [spec] * n, "row": [int(r) for r in batch["__row"]], "record": records,
                "error": [""] * n, "weight": [weight] * n, "file": [file] * n}

    return ds.map_batches(to_rows, batch_format="numpy", num_cpus=num_cpus)


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return _plain(v.tolist())
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
