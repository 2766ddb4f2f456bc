"""Cross-worker communication that is right for whichever backend Ray Train set up.

With GPUs, Ray Train's process group is NCCL, which only takes CUDA tensors: a collective on a CPU tensor
fails there and nowhere on a CPU cluster (gloo). sft-ray's own code therefore talks to other ranks only
through these helpers, which use object collectives (torch picks the device the backend needs) instead of
hand-made tensors.

``CollectiveGuard`` makes that mistake visible on a CPU: installed in a worker (``SFT_RAY_COLLECTIVE_GUARD``
names the backend to hold the code to, e.g. ``nccl``), it rejects any raw tensor collective issued directly
from sft-ray code whose tensors are not on the device that backend needs, and counts the calls it checked.
DeepSpeed's and the Trainer's own collectives pick their device from the accelerator and are left alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

GUARD_ENV = "SFT_RAY_COLLECTIVE_GUARD"
GUARD_LOG_ENV = "SFT_RAY_COLLECTIVE_GUARD_LOG"
# backend -> device types its collectives accept
BACKEND_DEVICES = {"nccl": {"cuda"}, "gloo": {"cpu"}, "mpi": {"cpu", "cuda"}, "xccl": {"xpu"}, "hccl": {"npu"}}
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
                      "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
                      "scatter", "send", "recv", "isend", "irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_ints(values: list[int]) -> list[int]:
    """Element-wise sum of a short list of integers over all ranks."""
    return [sum(col) for col in zip(*gather_objects([int(v) for v in values]))]


def allowed_devices(backend: str) -> set[str]:
    """Device types a backend's collectives take; ``cpu:gloo,cuda:nccl`` style strings allow each listed one."""
    backend = backend.lower()
    if ":" in backend:
        return {part.split(":", 1)[0] for part in backend.split(",")}
    return BACKEND_DEVICES.get(backend, {"cpu", "cuda"})


class CollectiveError(RuntimeError):
    pass


class CollectiveGuard:
    """Wraps torch.distributed's tensor collectives in this process; see the module docstring."""

    def __init__(self, backend: str, log: str | None = None):
        self.backend, self.allowed, self.log = backend, allowed_devices(backend), log
        self.checked = 0  # raw tensor collectives from sft-ray code (each one's devices checked)
        self.objects = 0  # object collectives from sft-ray code (torch picks the backend's device)

    def _tensors(self, args, kwargs):
        import torch

        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from (t for t in v if isinstance(t, torch.Tensor))

    def _wrap(self, name: str, fn):
        guard = self

        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if (caller == "sft_ray" or caller.startswith("sft_ray.")) and name in OBJECT_COLLECTIVES:
                guard.objects += 1
                guard._write()
            elif caller == "sft_ray" or caller.startswith("sft_ray."):
                guard.checked += 1
                for t in guard._tensors(args, kwargs):
                    if t.device.type not in guard.allowed:
                        raise CollectiveError(
                            f"{caller} calls torch.distributed.{name} on a {t.device.type} tensor; the {guard.backend} "
                            f"backend only takes {'/'.join(sorted(guard.allowed))} tensors (use sft_ray.collectives)")
                guard._write()
            return fn(*args, **kwargs)

        guarded._sft_ray_guarded = fn
        return guarded

    def _write(self) -> None:
        if self.log:
            Path(self.log).write_text(json.dumps({"backend": self.backend, "checked": self.checked,
                                                  "objects": self.objects}))

    def install(self) -> "CollectiveGuard":
        import torch.distributed as dist

        for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None and not hasattr(fn, "_sft_ray_guarded"):
                setattr(dist, name, self._wrap(name, fn))
        self._write()
        return self


def install_guard_from_env(rank: int) -> CollectiveGuard | None:
    """The test hook: ``SFT_RAY_COLLECTIVE_GUARD=nccl`` holds this worker's sft-ray collectives to NCCL's rules."""
    backend = os.environ.get(GUARD_ENV)
    if not backend:
        return None
    log_dir = os.environ.get(GUARD_LOG_ENV)
    return CollectiveGuard(backend, str(Path(log_dir, f"rank{rank}.json")) if log_dir else None).install()
