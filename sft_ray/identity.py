"""A run's identity: its resolved config and a digest of its tokenized data, kept beside its checkpoints.

Checkpoints are reused only by the run that wrote them. A re-run under the same ``train.name`` and
``train.storage_path`` resumes (or, if finished, hands back its model) only when everything that changes
the result is the same; otherwise it is refused, naming the keys that differ and the ways out. Keys that
only change where things go, how often they are saved or logged, or what happens after training (eval,
serve) are not part of the identity.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sft_ray.config import Config, ConfigError

RUN_FILE = "sft_ray_run.json"

# dotted keys (or prefixes ending in '.') that do not change the trained model
RESULT_FREE = (
    "train.name", "train.resume", "train.storage_path", "train.save_steps", "train.keep_checkpoints",
    "train.logging_steps", "train.max_failures", "train.report_to", "train.trace_examples", "train.eval_steps",
    "train.cpus_per_worker", "train.placement_strategy", "data.tokenize_cpus", "data.validate_first", "eval.",
    "serve.", "export.to", "output_dir", "ray_address",
)


def flatten(dump: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"name": x}}`` -> ``{"train.name": x}``; mappings inside a section (weights, columns,
    template_kwargs) stay whole values."""
    out: dict[str, Any] = {}
    for section, value in dump.items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def result_keys(cfg: Config) -> dict[str, Any]:
    flat = flatten(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items()
            if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESULT_FREE)}


def make(cfg: Config, data_digest: str, data_rows: int) -> dict[str, Any]:
    return {"config": result_keys(cfg), "data": {"digest": data_digest, "rows": data_rows},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities (empty when they match)."""
    a, b = saved.get("config", {}), now.get("config", {})
    # a key the saved identity lacks was added by a newer sft-ray: at its default it means what the older did
    defaults = result_keys(Config())
    diffs = [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])]
    da, db = saved.get("data", {}), now.get("data", {})
    if da.get("digest") != db.get("digest"):
        diffs.append(f"the tokenized training data ({da.get('rows')} rows, digest {da.get('digest')} -> "
                     f"{db.get('rows')} rows, digest {db.get('digest')}): a data file or the tokenizer changed")
    return diffs


# ----------------------------------------------------------------------------- storage (local path or URI)


def _fs(storage: str):
    import pyarrow.fs as pafs

    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), storage


def run_dir(storage: str, name: str) -> tuple[Any, str]:
    fs, root = _fs(storage)
    return fs, f"{root.rstrip('/')}/{name}"


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read(storage: str, name: str) -> dict[str, Any] | None:
    fs, d = run_dir(storage, name)
    if not exists(fs, f"{d}/{RUN_FILE}"):
        return None
    with fs.open_input_stream(f"{d}/{RUN_FILE}") as f:
        return json.loads(f.read().decode())


def write(storage: str, name: str, ident: dict[str, Any]) -> None:
    """Written whole to a temporary name, then moved, so a crash never leaves a half-written identity."""
    fs, d = run_dir(storage, name)
    fs.create_dir(d, recursive=True)
    tmp = f"{d}/.{RUN_FILE}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(ident, indent=1).encode())
    fs.move(tmp, f"{d}/{RUN_FILE}")


def has_checkpoints(storage: str, name: str) -> bool:
    import pyarrow.fs as pafs

    fs, d = run_dir(storage, name)
    if not exists(fs, d):
        return False
    return any(i.type == pafs.FileType.Directory and i.base_name.startswith(("checkpoint-", "final_model"))
               for i in fs.get_file_info(pafs.FileSelector(d)))


def clear(storage: str, name: str) -> None:
    fs, d = run_dir(storage, name)
    if exists(fs, d):
        fs.delete_dir(d)


def check(cfg: Config, now: dict[str, Any]) -> str:
    """'new' (nothing to reuse), or 'same' (checkpoints of this very run); raises ConfigError otherwise."""
    storage, name = cfg.storage_path, cfg.train.name
    if not has_checkpoints(storage, name):
        return "new"
    saved = read(storage, name)
    ways_out = (f"Use train.resume=false to delete them and start over, or another train.name (and output_dir) "
                "to keep both runs.")
    if saved is None:
        raise ConfigError(
            f"{storage}/{name} holds checkpoints but no record of the config that wrote them ({RUN_FILE}; an "
            f"older sft-ray), so they cannot be reused safely. {ways_out}")
    diffs = differences(saved, now)
    if diffs:
        shown = "\n  ".join(diffs)
        raise ConfigError(
            f"{storage}/{name} holds checkpoints of a run with a different config; reusing them would mix two "
            f"runs. Differences (checkpoints -> now):\n  {shown}\n{ways_out}")
    return "same"
