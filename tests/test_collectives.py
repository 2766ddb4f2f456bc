"""Collectives that are right for the backend in use. With GPUs, Ray Train's process group is NCCL, which
rejects CPU tensors; a CPU cluster (gloo) never would. The guard holds sft-ray's own collectives to NCCL's
rule on a CPU: it would have caught the CPU-tensor all-reduce that throughput logging used to do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sft_ray import collectives
from sft_ray.collectives import CollectiveError, CollectiveGuard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-process gloo group (the CPU backend); the guard pretends it is NCCL."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    saved = {n: getattr(dist, n) for n in collectives.TENSOR_COLLECTIVES + collectives.OBJECT_COLLECTIVES
             if hasattr(dist, n)}
    yield
    for n, fn in saved.items():
        setattr(dist, n, fn)
    dist.destroy_process_group()


def test_guard_rejects_a_cpu_tensor_collective_under_nccl(gloo_group, tmp_path):
    guard = CollectiveGuard("nccl", str(tmp_path / "g.json")).install()
    # the code throughput logging had before, run as sft-ray code (the guard looks at the calling module)
    old_src = ("import torch, torch.distributed as dist\n"
               "def old(tokens, trained):\n"
               "    t = torch.tensor([tokens, trained], dtype=torch.long)\n"
               "    dist.all_reduce(t)\n"
               "    return t.tolist()\n")
    mod = {"__name__": "sft_ray.worker_old"}
    exec(compile(old_src, "sft_ray/worker_old.py", "exec"), mod)
    with pytest.raises(CollectiveError, match="all_reduce on a cpu tensor; the nccl backend only takes cuda"):
        mod["old"](5, 3)
    # what sft-ray does now: object collectives, whose device torch picks for the backend
    assert collectives.sum_ints([5, 3]) == [5, 3]
    assert guard.objects >= 1 and json.loads((tmp_path / "g.json").read_text())["objects"] >= 1
    # the same CPU tensor is fine under gloo's rule, and code outside sft-ray is not the guard's business
    assert CollectiveGuard("gloo").allowed == {"cpu"} and collectives.allowed_devices("cpu:gloo,cuda:nccl") == {
        "cpu", "cuda"}
    t = torch.ones(2)
    dist.all_reduce(t)  # called from this test module: not checked
    assert guard.checked == 1


@pytest.mark.slow
def test_training_issues_only_collectives_nccl_would_take(tmp_path, tiny_model_dir):
    """The worker loop end to end (2 workers, ZeRO-2, eval and checkpoints) under the NCCL guard."""
    env = {**os.environ, "RAY_ADDRESS": "", collectives.GUARD_ENV: "nccl",
           collectives.GUARD_LOG_ENV: str(tmp_path / "guard")}
    (tmp_path / "guard").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "sft_ray.cli", "train", "jobs/configs/local-cpu.yaml", f"model.name={tiny_model_dir}",
         f"output_dir={tmp_path / 'run'}", "data.generated_train_rows=32", "data.generated_eval_rows=8",
         "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "deepspeed.zero_stage=2",
         "eval.enabled=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    logs = [json.loads(p.read_text()) for p in sorted((tmp_path / "guard").glob("rank*.json"))]
    assert len(logs) == 2 and all(g["backend"] == "nccl" for g in logs)
    assert all(g["objects"] >= 4 for g in logs)  # token counts at every log step, peak memory at the end
