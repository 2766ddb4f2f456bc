"""Two Ray nodes on one machine, for real: `ray start --head` plus `ray start --address=...`, each with its own
CPUs, and `sft-ray train` submitted to them as a driver on the head node.

The second node runs in its own mount namespace (``unshare --mount``, as root) with a tmpfs over one folder: that
folder is node-local, as a node's own disk is on a real cluster, while the rest of the file system is shared as
NFS would be. Checkpoints go to an S3-compatible server (moto's) on 127.0.0.1, with the endpoint and credentials
in each node's environment, as users give them.

- a ``train.storage_path`` that only the head node sees is refused before training, with the reason;
- ``train.placement_strategy=SPREAD`` puts the two workers on the two nodes, and the run exports its model;
- losing the second node (raylet, agents and worker SIGKILLed after a checkpoint) with ``train.max_failures=1``:
  Ray Train waits for the resources, the run goes on from the checkpoint on a replacement node and finishes with
  the same loss at every step, and the same examples, as the uninterrupted run.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fault_tolerance import SAVE, STEPS, _check_killed_mid_run, _losses, _trace, _wait_for, _worker_pids

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
PORT, DASHBOARD = 6393, 8293
BUCKET = "multinode"
START_TIMEOUT_S = 10  # Ray Train's wait for a worker group's resources before it tries again (default 60)


def _ns(pid) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class TwoNodes:
    def __init__(self, env: dict, local: Path):
        self.env, self.local = env, local
        self.node_ns: str | None = None  # the second node's mount namespace

    def add_node(self):
        """The second node: its own mount namespace, a tmpfs over ``local``, 2 CPUs."""
        script = (f"mount -t tmpfs tmpfs {shlex.quote(str(self.local))} && exec {shlex.quote(RAY)} start "
                  f"--address=127.0.0.1:{PORT} --num-cpus=2 --disable-usage-stats")
        subprocess.run(["unshare", "--mount", "sh", "-c", script], env=self.env, check=True, capture_output=True,
                       timeout=180)
        self.wait_nodes(2)
        raylets = [p for p in _pids("raylet") if _ns(p) != _ns("self")]
        assert len(raylets) == 1, [(p, _ns(p)) for p in _pids("raylet")]
        self.node_ns = _ns(raylets[0])

    def wait_nodes(self, n: int, timeout=120):
        code = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))")
        t0 = time.time()
        while time.time() - t0 < timeout:
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                 timeout=120)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(2)
        raise AssertionError(f"{n} nodes not alive after {timeout}s: {out.stdout[-500:]} {out.stderr[-2000:]}")

    def kill_node(self) -> int:
        """SIGKILL every process of the second node (raylet, agents, workers): the node is gone."""
        victims = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ns(p) == self.node_ns]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def driver(self, out: Path, *overrides) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "sft_ray.cli", "train", "jobs/configs/local-cpu.yaml", f"output_dir={out}",
               "train.name=ft", "data.generated_train_rows=96", "data.generated_eval_rows=8",
               "train.per_device_batch_size=4", "train.grad_accum=1", f"train.max_steps={STEPS}",
               f"train.save_steps={SAVE}", "train.eval_steps=100", "train.learning_rate=3e-3", "train.warmup_ratio=0",
               "train.trace_examples=true", "eval.enabled=false", "train.keep_checkpoints=2", *overrides]
        env = {**self.env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": f"127.0.0.1:{PORT}"}
        return subprocess.Popen(cmd, cwd=ROOT, stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _pids(name: str) -> list[int]:
    """Processes whose executable is called ``name`` (read from /proc: ps cuts its lines to the terminal)."""
    found = []
    for p in os.listdir("/proc"):
        try:
            argv0 = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        if p.isdigit() and Path(argv0).name == name:
            found.append(int(p))
    return found


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("unshare") is None or \
            subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and unshare(1) for the second node's own mount namespace")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    s3 = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    env = {**os.environ, **s3, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    import boto3

    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    local = tmp_path_factory.mktemp("node-local")
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    subprocess.run([RAY, "start", "--head", f"--port={PORT}", "--num-cpus=2", f"--dashboard-port={DASHBOARD}",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    cluster = TwoNodes(env, local)
    try:
        cluster.add_node()
        yield cluster
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        server.stop()


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_node_local_storage_path_is_refused_before_training(nodes, tmp_path, tiny_model_dir):
    proc = nodes.driver(tmp_path, f"model.name={tiny_model_dir}", f"train.storage_path={nodes.local}/store")
    assert proc.wait(300) != 0
    last = _last_line((tmp_path / "log.txt").read_text())
    assert last.startswith(f"sft-ray: train.storage_path={nodes.local}/store is not shared: node(s) ") and \
        "cannot see it" in last and "s3://" in last, last
    assert "plan:" not in (tmp_path / "log.txt").read_text()  # stopped before any training


def test_spread_workers_then_a_lost_node_resumes_on_its_replacement(nodes, tmp_path, tiny_model_dir):
    # uninterrupted, SPREAD: one worker per node, checkpoints in the bucket, the model exported
    ref = tmp_path / "uninterrupted"
    ref.mkdir()
    proc = nodes.driver(ref, f"model.name={tiny_model_dir}", f"train.storage_path=s3://{BUCKET}/ref",
                        "train.placement_strategy=SPREAD")
    try:
        _wait_for(ref / "log.txt", f"step 1/{STEPS}", proc)
        placed = sorted(_ns(p) == nodes.node_ns for p in _worker_pids())
        assert placed == [False, True], placed  # one worker on each node
        assert proc.wait(900) == 0, (ref / "log.txt").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (ref / "model" / "model.safetensors").is_file()
    losses, trace = _losses(ref), _trace(ref)
    assert sorted(losses) == list(range(1, STEPS + 1))
    tokens = {h["step"]: h["tokens"] for h in json.loads((ref / "model" / "train_history.json").read_text())
              if "loss" in h}
    reference = (losses, trace, tokens)

    # the same run, STRICT_SPREAD, losing the second node after a checkpoint
    lost = tmp_path / "lost"
    lost.mkdir()
    log = lost / "log.txt"
    proc = nodes.driver(lost, f"model.name={tiny_model_dir}", f"train.storage_path=s3://{BUCKET}/lost",
                        "train.placement_strategy=STRICT_SPREAD", "train.max_failures=1")
    try:
        _wait_for(log, f"step {2 * SAVE + 1}/{STEPS}", proc)  # checkpoint 6 has been reported
        t_kill = time.time()
        assert nodes.kill_node() >= 2
        # Ray Train cannot place 2 workers on 2 nodes any more: it waits, says so, and tries again
        _wait_for(log, "worker group startup timed out", proc, timeout=300)
        assert "resuming from checkpoint at step" not in log.read_text()
        t_add = time.time()
        nodes.add_node()  # the replacement
        _wait_for(log, "resuming from checkpoint at step", proc)
        assert proc.wait(900) == 0, log.read_text()[-4000:]
        t_done = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resumed = _check_killed_mid_run(log, lost, reference)
    assert (lost / "model" / "model.safetensors").is_file()
    print(f"\nlost node: killed after step {2 * SAVE + 1}; replacement added {t_add - t_kill:.1f}s later; resumed "
          f"from step {resumed}; finished {t_done - t_kill:.1f}s after the kill")
