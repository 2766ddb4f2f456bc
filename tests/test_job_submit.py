"""The README's local-cluster recipe, verbatim: `ray start --head` with the machine's own CPU count (on a 2-core
machine the two trainers then hold every CPU), `ray job submit` of jobs/sft.py, and the job runs to the end.
A run the cluster can never place is refused within seconds, with the numbers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster():
    """One `ray start --head` for the module's three tests (each start and stop costs ~10 s on 2 cores); every
    job on it ends before the next test starts."""
    # Ray 2.60 turns token auth on for `ray start`; the venv's bin first on PATH, as after `source .venv/bin/activate`,
    # so that the job's `python` entrypoint is the interpreter that has sft-ray's dependencies
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    subprocess.run(
        [RAY, "start", "--head", "--port=6391", "--dashboard-port=8291", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    yield env, "http://127.0.0.1:8291"
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_trains_and_exports(cluster, tmp_path, tiny_model_dir):
    env, address = cluster
    out = tmp_path / "run"
    cmd = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
        "python", "jobs/sft.py", "--config", "jobs/configs/local-cpu.yaml",
        f"model.name={tiny_model_dir}", f"output_dir={out}", "data.generated_train_rows=32",
        "data.generated_eval_rows=8", "train.per_device_batch_size=4", "train.save_steps=2", "eval.enabled=false",
        "data.packing=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    assert "plan: 4 optimizer steps" in log
    assert "waiting for resources" not in log  # the trainers' CPUs are free: the run's own warm-up is not other work
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "train_summary.json").is_file()


def test_job_that_cannot_be_placed_is_refused_with_the_numbers(cluster, tmp_path, tiny_model_dir):
    import time

    env, address = cluster
    workers = 2 * (os.cpu_count() or 1) + 2
    t0 = time.time()
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", "jobs/sft.py",
         "--config", "jobs/configs/local-cpu.yaml", f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
         f"train.num_workers={workers}", "data.generated_train_rows=64", "eval.enabled=false"],
        env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "can never place the run" in log and f"needs {workers} workers" in log and "train.num_workers" in log, \
        log[-3000:]
    assert time.time() - t0 < 120  # refused, not left waiting


def test_a_command_run_beside_a_running_cluster_joins_it(cluster, tmp_path, tiny_model_dir):
    """README: `ray_address` unset means RAY_ADDRESS, else a running cluster, else local Ray. `ray.init` finds a
    `ray start` cluster by itself and would then refuse a local start's CPU count."""
    env, _ = cluster
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "sft_ray.cli", "data", "preview", "jobs/configs/local-cpu.yaml",
         f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "data.generated_train_rows=16",
         "data.generated_eval_rows=4", "--n", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    joined = [line for line in log.splitlines() if "joining the Ray cluster at" in line]
    assert joined and joined[0].endswith(":6391"), log[-3000:]
