"""DeepSpeed on a Ray Train worker: its ZeRO config from the typed config, and its start-up.

Batch size, accumulation, clipping and precision are left as ``"auto"`` so transformers fills them
from the SFTConfig: one source of truth, no mismatch between Trainer and DeepSpeed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

# A JIT build lock this old with no process holding it open was left by a build that was killed
STALE_LOCK_AGE_S = 60.0
# where /proc cannot tell (another user's processes), only a lock older than a build could take is cleared
UNKNOWN_HOLDER_LOCK_AGE_S = 1800.0


def build(ds_cfg, on_gpu: bool, precision: str) -> dict[str, Any] | None:
    if not ds_cfg.enabled:
        return None
    zero: dict[str, Any] = {"stage": ds_cfg.zero_stage}
    if ds_cfg.zero_stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size="auto")
    if ds_cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # the 16-bit gather is what makes save_model write real weights instead of empty shards
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # Trainer logs; DeepSpeed's own step prints would duplicate them
        "wall_clock_breakdown": False,
        # the optimizer is Trainer's (torch AdamW); with offload, DeepSpeed's CPU Adam is used
        "zero_allow_untested_optimizer": True,
    }


def init_distributed(on_gpu: bool, say=print) -> None:
    """Adopt Ray Train's process group in DeepSpeed's comm layer, without the JIT build that can hang it.

    On CPU, DeepSpeed's comm layer compiles its shared-memory all-reduce op (a C++ build, about a minute)
    on every fresh node, yet only inference all-reduce uses it: it is skipped. Any JIT build (``cpu_adam`` for
    optimizer offload) waits on a lock file with no timeout, so a worker killed mid-build (a failed run, a lost
    node) would hang every later run on that node: stale locks are cleared first."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for lock in clear_stale_build_locks():
        say(f"removed a stale DeepSpeed/torch build lock (its build was killed): {lock}")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def build_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR`` or its default under ~/.cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove JIT build lock files (torch's ``FileBaton``: ``<root>[/<py_cu>]/<op>/lock``) that no build holds.

    A live build keeps its lock open from creation to release, so on Linux a lock that no process has open and
    that is older than a moment belongs to a killed build."""
    root = build_root() if root is None else root
    now = time.time() if now is None else now
    locks = [p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern)]
    if not locks:
        return []
    held, complete = _open_files()
    removed = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        limit = STALE_LOCK_AGE_S if complete else UNKNOWN_HOLDER_LOCK_AGE_S
        if age < limit or str(lock.resolve()) in held:
            continue
        try:
            lock.unlink()
            removed.append(lock)
        except FileNotFoundError:
            pass
    return removed


def _open_files() -> tuple[set[str], bool]:
    """Paths that processes on this machine have open, and whether every process could be read."""
    held, complete = set(), Path("/proc/self/fd").is_dir()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    held.add(os.readlink(fd))
                except OSError:
                    pass
        except PermissionError:
            complete = False
        except OSError:
            pass  # the process ended meanwhile
    return held, complete
