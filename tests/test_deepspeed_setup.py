"""DeepSpeed's start-up on a worker must never wait on a build lock that nobody holds.

A worker killed while DeepSpeed JIT-compiled an op (a run stopped by a bad row, a lost node) leaves torch's
lock file behind, and torch waits on it forever: the next run on that node hung after "worker: cpu ...".
"""

import os
import subprocess
import sys
import time

from sft_ray.deepspeed import UNKNOWN_HOLDER_LOCK_AGE_S, clear_stale_build_locks


def _lock(root, name, age):
    lock = root / "py311_cpu" / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_only_old_locks_that_no_process_holds_are_removed(tmp_path):
    stale = _lock(tmp_path, "cpu_adam", age=600)
    fresh = _lock(tmp_path, "fused_adam", age=1)  # a build that has only just started
    held = _lock(tmp_path, "deepspeed_shm_comm", age=600)  # a long build still running: its lock is open
    fd = os.open(held, os.O_RDONLY)
    try:
        assert clear_stale_build_locks(tmp_path) == [stale]
    finally:
        os.close(fd)
    assert not stale.exists() and fresh.exists() and held.exists()
    # once its holder is gone, an old lock is stale too
    assert clear_stale_build_locks(tmp_path) == [held]
    # without a lock or a root, nothing happens
    assert clear_stale_build_locks(tmp_path / "missing") == []


def test_locks_at_the_root_of_torch_extensions_dir_are_found(tmp_path, monkeypatch):
    """TORCH_EXTENSIONS_DIR holds ops directly (<dir>/<op>/lock), the default root one level deeper."""
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert clear_stale_build_locks(now=time.time() + UNKNOWN_HOLDER_LOCK_AGE_S + 1) == [lock]


def test_worker_start_up_skips_the_inference_only_shm_build(tmp_path):
    """The shm all-reduce op is a C++ build per fresh node that only inference uses: DeepSpeed's comm layer
    starts on a gloo group (as on a CPU worker) without building anything, and a stale lock does not stop it."""
    stale = _lock(tmp_path, "deepspeed_shm_comm", age=600)
    code = (
        "import os, torch.distributed as dist\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "from sft_ray.deepspeed import init_distributed\n"
        "init_distributed(on_gpu=False)\n"
        "import deepspeed.comm as c, deepspeed.comm.comm as cc\n"
        "assert c.is_initialized() and c.get_world_size() == 1\n"
        "assert cc.cdb.shm_comm_op is None\n"
        "print('ok')\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "py311_cpu"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert "removed a stale DeepSpeed/torch build lock" in proc.stdout and not stale.exists()
    assert [p.name for p in (tmp_path / "py311_cpu").iterdir()] == ["deepspeed_shm_comm"]
    assert list((tmp_path / "py311_cpu" / "deepspeed_shm_comm").iterdir()) == []  # nothing was built
