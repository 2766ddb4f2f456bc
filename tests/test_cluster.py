"""Before training: a run the cluster can never place is refused at once, with the numbers and the keys to
change; streamed data never waits for CPUs that the trainers hold."""

import time

import pytest

from sft_ray.cluster import Fit, check_resources, streaming_data_cpus
from sft_ray.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("ray_local")


def test_a_run_that_fits_is_let_through():
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    fit = check_resources(load_config(None, [f"train.num_workers={cpus}"]), use_gpu=False)
    assert fit.bundles_now == cpus and fit.bundles_max is None  # local Ray: no autoscaler


@pytest.mark.parametrize("overrides, use_gpu, needle", [
    (["train.num_workers=50"], False, "needs 50 workers x (1 CPU) = 50 CPUs"),
    (["train.num_workers=1", "train.cpus_per_worker=64"], False, "needs 1 workers x (64 CPUs)"),
    (["train.num_workers=2"], True, "needs 2 workers x (1 CPU + 1 GPU) = 2 CPUs and 2 GPUs"),
])
def test_a_run_that_can_never_be_placed_is_refused_with_the_numbers(overrides, use_gpu, needle):
    import ray

    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        check_resources(load_config(None, overrides), use_gpu=use_gpu)
    msg = str(e.value)
    assert needle in msg and f"the cluster has {ray.cluster_resources()['CPU']:g} CPUs" in msg, msg
    assert "no autoscaler" in msg and "train.num_workers" in msg
    assert time.time() - t0 < 5


def test_streamed_data_tasks_ask_for_no_cpu_when_the_trainers_hold_them_all():
    cfg = load_config(None, ["train.num_workers=2", "data.tokenize_cpus=0.5"])
    assert streaming_data_cpus(cfg, Fit(2, None, 2.0, 0.0, 2.0, 1)) == 0.0  # `ray start --head` on 2 cores
    assert streaming_data_cpus(cfg, Fit(3, None, 3.0, 0.0, 3.0, 1)) == 0.5  # one CPU to spare


@pytest.mark.parametrize("strategy, ok", [("PACK", True), ("SPREAD", True), ("STRICT_PACK", True),
                                          ("STRICT_SPREAD", False)])
def test_strict_placement_that_one_node_can_never_satisfy_is_refused(strategy, ok):
    """Local Ray is one node: STRICT_SPREAD for 2 workers would wait forever for a second node."""
    cfg = load_config(None, ["train.num_workers=2", f"train.placement_strategy={strategy}"])
    if ok:
        assert check_resources(cfg, use_gpu=False).per_node  # the node's own count is known
        return
    with pytest.raises(ConfigError, match=r"train.placement_strategy=STRICT_SPREAD needs 2 workers x \(1 CPU\) "
                                          r"each on a node of its own; the cluster has .* on 1 node \(\d+ such "
                                          r"worker\(s\) per node\) and no autoscaler"):
        check_resources(cfg, use_gpu=False)


def test_strict_pack_counts_the_largest_node_not_the_sum():
    fit = Fit(4, None, 4.0, 0.0, 4.0, 2, (2, 2))
    assert (fit.placeable("PACK"), fit.placeable("STRICT_PACK"), fit.placeable("STRICT_SPREAD")) == (4, 2, 2)


def test_the_wait_is_announced_only_when_other_work_holds_the_cpus(capfd):
    """The run's own warm-up tasks start after this check, so an idle cluster never reads as busy; an actor
    holding CPUs does."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    cfg = load_config(None, ["train.num_workers=2"])
    check_resources(cfg, use_gpu=False)
    assert "waiting for resources" not in capfd.readouterr().out

    holder = ray.remote(num_cpus=cpus - 1)(type("Holder", (), {"ping": lambda self: 1})).remote()
    ray.get(holder.ping.remote())
    try:
        check_resources(cfg, use_gpu=False)
        out = capfd.readouterr().out
        assert f"waiting for resources: 2 workers x (1 CPU) need 2 CPUs; 1 of {cpus} are free now" in out, out
    finally:
        ray.kill(holder)


def test_object_storage_endpoint_reaches_the_workers_and_the_keys_do_not(tmp_path):
    """README: the endpoint and region travel from the driver to Ray's workers (runtime_env), never the keys:
    those come from each node's own environment or instance role, and a runtime_env is shown by Ray's dashboard
    and job records."""
    import json
    import os
    import subprocess
    import sys

    secret = "sk-not-for-the-runtime-env"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIA-TEST", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_SESSION_TOKEN": secret, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1"}
    env.pop("RAY_ADDRESS", None)
    code = ("import json, ray; from sft_ray.config import Config; from sft_ray.cluster import init_ray; "
            "init_ray(Config()); print('ENV=' + json.dumps(ray.get_runtime_context().runtime_env.get('env_vars')))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    line = [x for x in proc.stdout.splitlines() if x.startswith("ENV=")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    forwarded = json.loads(line[0][4:])
    assert forwarded["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and forwarded["AWS_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(forwarded)
    assert secret not in proc.stdout + proc.stderr


def test_an_export_destination_that_cannot_be_written_stops_the_run_before_training(tmp_path, tiny_model_dir):
    """README: export.to is checked writable before training (here a path under a file), not after the run."""
    from sft_ray.train import run

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = load_config("jobs/configs/local-cpu.yaml", [f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                                                      f"export.to={blocker}/models", "data.generated_train_rows=8",
                                                      "data.generated_eval_rows=2"])
    t0 = time.time()
    with pytest.raises(ConfigError, match=rf"export.to={blocker}/models cannot be written: .*The finished model"):
        run(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before the data pass and the run's files
    assert time.time() - t0 < 60
