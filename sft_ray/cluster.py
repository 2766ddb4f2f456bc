"""The Ray cluster a run uses: joining or starting it, and checking before training that it can hold the run.

Checked up front, each with the numbers and the keys to change: the trainers' resources against what the
cluster has or its autoscaler can add (so a run that can never be placed is refused within seconds instead of
waiting forever), and, on more than one node, that checkpoint storage is shared by every node.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from sft_ray.config import Config, ConfigError


def say(msg: str) -> None:
    """Progress line to the job log. Not print(): Ray Train patches print into a logger and tees it."""
    sys.__stdout__.write(f"[sft-ray] {msg}\n")
    sys.__stdout__.flush()


def _sigterm_as_interrupt() -> None:
    """SIGTERM (``ray job stop``, a scheduler) stops a driver like Ctrl-C does: Python unwinds, Ray shuts
    down its workers, checkpoints stay. Installed after ``ray.init``, whose own handler aborts the process."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def init_ray(cfg: Config) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), the configured one, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    try:
        _init_ray(cfg)
    finally:
        _sigterm_as_interrupt()


def _init_ray(cfg: Config) -> None:
    import ray

    env_vars = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
    # where object storage is (never credentials: those come from each node's environment or instance role),
    # and how long Ray Train waits for its workers' resources before it tries again (see the README)
    for name in ("SFT_RAY_CACHE", "SFT_RAY_COLLECTIVE_GUARD", "SFT_RAY_COLLECTIVE_GUARD_LOG", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or running_cluster()
    if address:
        say(f"joining the Ray cluster at {address}")
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    # one logical CPU beyond the trainers, so that evaluation actors and data tasks never wait on them;
    # the dashboard (127.0.0.1 only) serves the state API that Ray Train's placement-group cleaner polls
    ray.init(num_cpus=max(os.cpu_count() or 1, need + 1), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env_vars}, log_to_driver=True, logging_level=logging.WARNING)


def running_cluster() -> str | None:
    """The address of a Ray cluster started on this machine with ``ray start``, if one is running.

    ``ray.init()`` would join it by itself, and then refuses the ``num_cpus`` that a local start passes; the
    lookup is Ray's own (``/tmp/ray/ray_current_cluster``, then its running GCS processes)."""
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment(None, None)
    except Exception:  # Ray moved its helper: start locally, as before
        return None


@dataclass
class Fit:
    """What the cluster offers the run's worker bundles (``{CPU: cpus_per_worker[, GPU: 1]}`` each)."""

    bundles_now: int  # bundles the alive nodes can hold, counting their total resources
    bundles_max: int | None  # ... including what the autoscaler may add (None: no autoscaler reported)
    total_cpus: float
    total_gpus: float
    free_cpus: float  # not held by anything right now
    nodes: int
    per_node: tuple[int, ...] = ()  # bundles each alive node can hold

    def placeable(self, strategy: str) -> int:
        """Workers the alive nodes can hold under a placement strategy (the STRICT_ ones limit it)."""
        if strategy == "STRICT_PACK":
            return max(self.per_node, default=0)
        if strategy == "STRICT_SPREAD":
            return sum(1 for n in self.per_node if n > 0)
        return self.bundles_now

    @property
    def can_grow(self) -> bool:
        return self.bundles_max is not None and self.bundles_max > self.bundles_now


def _bundles(resources: dict, bundle: dict[str, float]) -> int:
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def cluster_fit(bundle: dict[str, float]) -> Fit:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = tuple(_bundles(n.get("Resources", {}), bundle) for n in nodes)
    now = sum(per_node)
    bundles_max = None
    try:  # the autoscaler (ray up, KubeRay) reports its node types and their max counts to the GCS
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception:
        config = None
    groups = list(config.node_group_configs) if config is not None else []
    if any(g.max_count == -1 or g.max_count > g.min_count for g in groups):
        cap = 0
        for g in groups:
            per_node = _bundles(dict(g.resources), bundle)
            if per_node and g.max_count == -1:
                cap = sys.maxsize
                break
            cap += per_node * max(g.max_count, 0)
        bundles_max = max(now, cap)
    total = ray.cluster_resources()
    free = ray.available_resources()
    return Fit(now, bundles_max, total.get("CPU", 0.0), total.get("GPU", 0.0), free.get("CPU", 0.0), len(nodes),
               per_node)


def check_resources(cfg: Config, use_gpu: bool) -> Fit:
    """Refuse, with the numbers, a run whose workers this cluster can never place; say when it must wait."""
    t = cfg.train
    bundle = {"CPU": float(t.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    fit = cluster_fit(bundle)
    want = t.num_workers
    each = f"{t.cpus_per_worker} CPU{'s' if t.cpus_per_worker > 1 else ''}" + (" + 1 GPU" if use_gpu else "")
    have = (f"the cluster has {fit.total_cpus:g} CPUs and {fit.total_gpus:g} GPUs on {fit.nodes} node"
            f"{'s' if fit.nodes != 1 else ''}")
    strategy = t.placement_strategy
    if fit.bundles_now >= want and fit.placeable(strategy) < want and not fit.can_grow:
        how = ("one node holding them all" if strategy == "STRICT_PACK" else "each on a node of its own")
        raise ConfigError(
            f"this cluster can never place the run: train.placement_strategy={strategy} needs {want} workers x "
            f"({each}) {how}; {have} ({', '.join(str(n) for n in fit.per_node)} such worker(s) per node) and no "
            f"autoscaler to add nodes. Use train.placement_strategy=PACK or SPREAD, or change train.num_workers")
    if fit.bundles_now >= want:
        if fit.free_cpus < want * t.cpus_per_worker:
            say(f"waiting for resources: {want} workers x ({each}) need {want * t.cpus_per_worker} CPUs; "
                f"{fit.free_cpus:g} of {fit.total_cpus:g} are free now (other work holds the rest)")
        return fit
    if fit.can_grow and (fit.bundles_max or 0) >= want:
        say(f"waiting for the autoscaler: {want} workers x ({each}); {have}, room for {fit.bundles_now} now")
        return fit
    limit = fit.bundles_max if fit.bundles_max is not None else fit.bundles_now
    grow = "" if fit.bundles_max is not None else " and no autoscaler to add nodes"
    keys = "train.num_workers, train.cpus_per_worker" + (", train.use_gpu" if use_gpu else "")
    raise ConfigError(
        f"this cluster can never place the run: it needs {want} workers x ({each}) = "
        f"{want * t.cpus_per_worker} CPUs{f' and {want} GPUs' if use_gpu else ''}; {have}{grow}, room for "
        f"{limit} such worker{'s' if limit != 1 else ''}. Change {keys} (e.g. train.num_workers={max(limit, 1)}) "
        "or add nodes")


def check_storage_shared(storage: str) -> None:
    """On a multi-node cluster every node must see ``storage_path`` (each rank uploads its own shards there,
    and a restarted worker group may land on other nodes). URIs (s3://, gs://, ...) are shared by nature;
    a local path is checked: a marker written here must be visible from a task on every node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if "://" in storage:
        check_storage_writable(storage)
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    Path(storage).mkdir(parents=True, exist_ok=True)
    marker = Path(storage, f".sft-ray-shared-{uuid.uuid4().hex}")
    marker.write_text("ok\n")
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, ray.get(refs, timeout=120)) if not ok]
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise ConfigError(
            f"train.storage_path={storage} is not shared: node(s) {', '.join(missing)} cannot see it. On more "
            "than one node, checkpoints must go where every node reads and writes the same files: object "
            "storage (train.storage_path=s3://bucket/runs or gs://...) or an NFS mount at the same path everywhere"
        )


def check_storage_writable(storage: str, key: str = "train.storage_path",
                           what: str = "Checkpoints go there") -> None:
    """Object storage is checked before training, not at the first checkpoint: a marker is written and
    deleted under ``storage``, so a missing bucket, refused credentials or an unreachable endpoint stop the run
    with the URI and the storage's own reason."""
    import pyarrow.fs as pafs

    try:
        if "://" in storage:
            fs, root = pafs.FileSystem.from_uri(storage)
        else:
            fs, root = pafs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
        if fs.type_name == "local":  # Ray Train creates a local folder itself; a bucket must already exist
            fs.create_dir(root, recursive=True)
        marker = f"{root.rstrip('/')}/.sft-ray-write-check-{uuid.uuid4().hex}"
        with fs.open_output_stream(marker) as f:
            f.write(b"ok\n")
        fs.delete_file(marker)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={storage} cannot be written: {e}. {what}; check the bucket, the credentials "
                          "and the endpoint (e.g. AWS_ENDPOINT_URL) where the driver and the workers run") from None


def use_gpu(cfg: Config) -> bool:
    import ray

    return bool(ray.cluster_resources().get("GPU", 0) >= 1) if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)


def check_gpu_only_options(cfg: Config, on_gpu: bool) -> None:
    """Options whose kernels exist only for CUDA: refused up front on a CPU cluster, with what to do instead."""
    if on_gpu:
        return
    if cfg.lora.quantize_4bit:
        raise ConfigError("lora.quantize_4bit (QLoRA) needs CUDA GPUs: bitsandbytes' 4-bit kernels do not run on "
                          "this cluster's CPUs. Use lora.quantize_4bit=false (LoRA on full-precision weights).")
    if cfg.train.liger_kernel:
        raise ConfigError("train.liger_kernel needs CUDA GPUs (Liger's kernels are Triton); this cluster has none. "
                          "Use train.liger_kernel=false.")


def streaming_data_cpus(cfg: Config, fit: Fit) -> float:
    """CPUs per Ray Data task for data that streams *while* the trainers run (``data.shuffle=stream``).

    Those tasks need CPUs outside the trainers' placement group; where the trainers hold every CPU of the
    cluster, a task asking for any would wait forever, so they ask for none and share the trainers' cores."""
    spare = fit.total_cpus - cfg.train.num_workers * cfg.train.cpus_per_worker
    if spare >= cfg.data.tokenize_cpus:
        return cfg.data.tokenize_cpus
    say(f"the trainers hold {fit.total_cpus - max(spare, 0):g} of the cluster's {fit.total_cpus:g} CPUs: the streamed "
        "data tasks reserve none and share the trainers' cores")
    return 0.0
