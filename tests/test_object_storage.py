"""Object storage for real: an S3-compatible server (moto's standalone server, as Ray's own S3 tests use) on
127.0.0.1, reached over HTTP with the endpoint and credentials given the way users give them
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). No filesystem class is patched: pyarrow talks to the server."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from sft_ray import data, sources, synthetic
from sft_ray.config import ConfigError, load_config
from sft_ray.sources import SourceError

BUCKET = "sft-ray-test"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, a bucket with JSONL and Parquet shards under data/, and the same files on local disk."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        local = tmp_path_factory.mktemp("local-data")
        rows = synthetic.generate(60, seed=5)
        synthetic.write_jsonl(rows[:20], local / "part-0.jsonl")
        synthetic.write_jsonl(rows[20:40], local / "part-1.jsonl")
        pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in rows[40:]]), local / "part-2.parquet")
        fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
        for f in sorted(local.iterdir()):
            with fs.open_output_stream(f"{BUCKET}/data/{f.name}") as out:
                out.write(f.read_bytes())
        yield {"env": env, "local": local, "port": port}
    server.stop()


@pytest.fixture(scope="module")
def ray_s3(s3, ray_local):
    """Local Ray started after the endpoint is in the environment (its workers read the bucket too)."""
    return ray_local


def _stats(specs, cfg):
    return data.validate(data.tokenized(specs, cfg), "train")


def test_prefixes_and_globs_on_s3_read_the_same_rows_as_local_files(s3, ray_s3, tiny_model_dir):
    prefix = f"s3://{BUCKET}/data/"
    assert sources.expand(prefix) == [f"s3://{BUCKET}/data/part-{i}.{e}" for i, e in
                                      ((0, "jsonl"), (1, "jsonl"), (2, "parquet"))]
    assert sources.expand(f"s3://{BUCKET}/data/*.jsonl") == [f"s3://{BUCKET}/data/part-{i}.jsonl" for i in (0, 1)]
    assert sources.expand(f"s3://{BUCKET}/**/part-[2-9].parquet") == [f"s3://{BUCKET}/data/part-2.parquet"]
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "data.max_length=256"])
    remote = _stats([prefix], cfg)
    local = _stats([str(s3["local"])], cfg)
    assert remote.rows == local.rows == 60 and remote.bad == 0
    assert (remote.tokens, remote.trained_tokens, remote.digest) == (local.tokens, local.trained_tokens, local.digest)


def test_missing_bucket_prefix_or_files_name_the_uri_and_the_reason(s3):
    with pytest.raises(SourceError, match=r"s3://no-such-bucket/data/: not found: there is no bucket .no-such-bucket."):
        sources.expand("s3://no-such-bucket/data/")
    with pytest.raises(SourceError, match=rf"s3://{BUCKET}/nothing/: not found"):
        sources.expand(f"s3://{BUCKET}/nothing/")
    with pytest.raises(SourceError, match=rf"s3://{BUCKET}/data/\*.csv: no dataset files found"):
        sources.expand(f"s3://{BUCKET}/data/*.csv")


def test_unwritable_storage_path_is_refused_before_training(s3):
    from sft_ray.cluster import check_storage_writable

    check_storage_writable(f"s3://{BUCKET}/runs")  # writable: the marker is written and removed
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    assert fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs", allow_not_found=True)) == []
    with pytest.raises(ConfigError, match=r"train.storage_path=s3://no-such-bucket/runs cannot be written: .*bucket"):
        check_storage_writable("s3://no-such-bucket/runs")


def test_cli_stops_on_a_missing_bucket_with_the_uri_as_its_last_line(s3, tmp_path):
    env = {**os.environ, **s3["env"], "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-m", "sft_ray.cli", "train", "jobs/configs/local-cpu.yaml",
                          "data.train=s3://no-such-bucket/train/", f"output_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    last = (out.stdout + out.stderr).strip().splitlines()[-1]
    assert last.startswith("sft-ray: s3://no-such-bucket/train/: not found: there is no bucket"), last


@pytest.mark.slow
def test_training_with_data_and_checkpoints_on_s3(s3, ray_s3, tiny_model_dir, tmp_path):
    """Data read from the bucket, checkpoints and the run's identity written to it, the model exported; the
    same command again finds the finished run in the bucket instead of training again."""
    from sft_ray.train import run

    def cfg():
        return load_config("jobs/configs/local-cpu.yaml", [
            f"model.name={tiny_model_dir}", f"output_dir={tmp_path}", "train.name=on-s3",
            f"data.train=[s3://{BUCKET}/data/*.jsonl]", "data.eval_fraction=0.1", f"train.storage_path=s3://{BUCKET}/runs",
            "train.per_device_batch_size=4", "train.save_steps=2", "eval.enabled=false", "train.precision=fp32",
            "data.packing=false"])

    first = run(cfg())
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    stored = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/on-s3"))}
    assert any(n.startswith("checkpoint-") for n in stored) and "final_model" in stored, stored
    assert first["checkpoint"].startswith(f"{BUCKET}/runs/on-s3/") or "s3://" in first["checkpoint"], first["checkpoint"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    again = run(cfg())
    assert again["resumed_finished_run"] is True
    assert again["metrics"]["step"] == first["metrics"]["step"]

    # the final model in the bucket is served, evaluated or generated from through a checked local copy
    from sft_ray.modeling import ModelError, resolve_model_path

    uri = f"s3://{BUCKET}/runs/on-s3/final_model"
    copy = Path(resolve_model_path(uri))
    assert (copy / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()
    assert Path(resolve_model_path(uri)) == copy  # unchanged in the bucket: the copy is used again
    out = subprocess.run([sys.executable, "-m", "sft_ray.cli", "generate", uri, "Say hi"], capture_output=True,
                         text=True, env={**os.environ, **s3["env"]}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
    # a folder whose upload was cut short (a file its marker lists is missing) is refused, not served
    for info in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/on-s3/final_model")):
        if info.base_name != "model.safetensors":
            fs.copy_file(info.path, f"{BUCKET}/cut-short/{info.base_name}")
    with pytest.raises(ModelError, match=r"s3://.*/cut-short: not a complete model folder \(model.safetensors"):
        resolve_model_path(f"s3://{BUCKET}/cut-short")


def test_refused_credentials_name_the_uri_and_the_reason(s3, monkeypatch):
    """A second S3 server with authentication on (moto's IAM checks from the first request): the test's keys
    are not in its records, so listing data and writing the storage path are refused, and said so."""
    import socket
    import time

    from sft_ray.cluster import check_storage_writable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "import sys; from moto.server import main; main(sys.argv[1:])",
                               "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(SourceError, match=r"s3://locked/data/: cannot list it: .*(Access Key Id|InvalidAccessKeyId|ACCESS_DENIED|AccessDenied)"):
            sources.expand("s3://locked/data/")
        with pytest.raises(ConfigError, match=r"train.storage_path=s3://locked/runs cannot be written: .*(Access Key Id|InvalidAccessKeyId|ACCESS_DENIED|AccessDenied)"):
            check_storage_writable("s3://locked/runs")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_export_to_a_bucket_is_never_taken_for_a_model_while_it_is_written(s3, tmp_path, tiny_model_dir):
    """export.to: the previous export is replaced, the upload marker is there until the last file is written
    (a folder cut short is refused by name), and a local destination is swapped in whole."""
    import shutil

    from sft_ray.export import UPLOADING, publish
    from sft_ray.modeling import ModelError, download_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "README.md").write_text("card")
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    with fs.open_output_stream(f"{BUCKET}/models/m/stale-from-before.bin") as f:
        f.write(b"old")
    publish(model, f"s3://{BUCKET}/models/m")
    stored = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/models/m"))}
    assert stored == {p.name for p in model.iterdir()}, stored  # the stale file went, no marker left
    copy = download_model(f"s3://{BUCKET}/models/m")
    assert (copy / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    with fs.open_output_stream(f"{BUCKET}/models/m/{UPLOADING}") as f:  # as an upload cut short leaves it
        f.write(b"")
    with pytest.raises(ModelError, match=rf"s3://{BUCKET}/models/m: not a complete model folder \(an export to "
                                         r"it is under way or was cut short"):
        download_model(f"s3://{BUCKET}/models/m")
    (model / "README.md").write_text("card v2")
    publish(model, str(tmp_path / "published"))
    publish(model, str(tmp_path / "published"))  # again: replaced whole
    assert (tmp_path / "published" / "README.md").read_text() == "card v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "published"]


@pytest.mark.slow
def test_stopped_driver_resumes_from_the_bucket_exports_there_and_is_evaluated_from_it(s3, tmp_path, tiny_model_dir):
    """The driver stopped (SIGTERM) after a checkpoint; the same command (plus export.to) finds the checkpoints in
    the bucket and resumes, copies the finished folder with its model card to the bucket, and `sft-ray eval`
    compares the base model with that copy."""
    import signal
    import time

    env = {**os.environ, **s3["env"], "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sft_ray.cli", "train", "jobs/configs/local-cpu.yaml", f"model.name={tiny_model_dir}",
           f"output_dir={tmp_path}", "train.name=stopped", f"data.train=[s3://{BUCKET}/data/*.jsonl]",
           "data.eval_fraction=0.1", f"train.storage_path=s3://{BUCKET}/runs", "train.per_device_batch_size=2",
           "train.max_steps=8", "train.save_steps=2", "eval.enabled=false", "train.precision=fp32"]
    log = tmp_path / "first.txt"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        t0 = time.time()
        while "step 4/8" not in log.read_text():  # checkpoint 2 is in the bucket
            assert proc.poll() is None and time.time() - t0 < 600, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    assert any(i.base_name.startswith("checkpoint-") for i in fs.get_file_info(
        pafs.FileSelector(f"{BUCKET}/runs/stopped"))), "no checkpoint in the bucket"

    again = subprocess.run([*cmd, f"export.to=s3://{BUCKET}/models/stopped"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-4000:]
    assert "resuming from checkpoint at step" in text, text[-3000:]
    assert f"model folder copied to s3://{BUCKET}/models/stopped" in text
    stored = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/models/stopped"))}
    assert {"README.md", "model.safetensors", "sft_ray_final.json", "tokenizer.json"} <= stored, stored
    assert not any(n.startswith(".sft-ray") for n in stored), stored

    ev = subprocess.run([sys.executable, "-m", "sft_ray.cli", "eval", str(tmp_path), "eval.max_examples=4",
                         "eval.probes=[Say hi]", "--model", f"s3://{BUCKET}/models/stopped"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics, metrics

    # and served from the bucket: `sft-ray serve URI` makes a checked local copy, then answers the openai client
    import httpx
    import openai

    port = 8127
    serve_log = tmp_path / "serve.txt"
    server = subprocess.Popen([sys.executable, "-m", "sft_ray.cli", "serve", f"s3://{BUCKET}/models/stopped",
                               "--port", str(port), "serve.model_name=tuned"], cwd=ROOT, env=env,
                              stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while "Ctrl-C stops" not in serve_log.read_text():
            assert server.poll() is None and time.time() - t0 < 300, serve_log.read_text()[-3000:]
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        r = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4 and r.model == "tuned"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert f"serving s3://{BUCKET}/models/stopped at http://127.0.0.1:{port}/v1" in serve_log.read_text()


def test_generated_data_goes_beside_checkpoints_in_object_storage(s3, tmp_path):
    """On a cluster the data tasks run on nodes that do not have the driver's disk (KubeRay's head has no CPUs):
    with train.storage_path on object storage, the built-in task is read from there, the same rows."""
    from sft_ray.sources import SourceError, iter_file
    from sft_ray.train import resolve_data

    cfg = load_config(None, [f"output_dir={tmp_path}", f"train.storage_path=s3://{BUCKET}/runs", "train.name=gen",
                             "data.generated_train_rows=12", "data.generated_eval_rows=4", "data.eval=[generated]"])
    train, evals = resolve_data(cfg)
    # beside the run's folder, not in it (train.resume=false deletes that folder, and Ray Train owns it)
    gen = f"s3://{BUCKET}/runs/.sft-ray-generated/gen"
    assert (train, evals) == ([f"{gen}/train.jsonl"], [f"{gen}/eval.jsonl"])
    for uri, local in ((train[0], tmp_path / "data" / "train.jsonl"), (evals[0], tmp_path / "data" / "eval.jsonl")):
        assert [r["record"] for r in iter_file(uri)] == [r["record"] for r in iter_file(str(local))]
    assert len(list(iter_file(train[0]))) == 12
    # a local storage path keeps the local files; a file:// one (a shared mount) gets its folders made; a bucket
    # that is not there is named
    assert resolve_data(load_config(None, [f"output_dir={tmp_path}"]))[0] == [str(tmp_path / "data" / "train.jsonl")]
    shared = resolve_data(load_config(None, [f"output_dir={tmp_path}", f"train.storage_path=file://{tmp_path}/nfs",
                                             "train.name=gen"]))[0]
    assert shared == [f"file://{tmp_path}/nfs/.sft-ray-generated/gen/train.jsonl"] and len(list(iter_file(shared[0]))) > 0
    with pytest.raises(SourceError, match=r"s3://no-such-bucket/runs/.sft-ray-generated/gen/train.jsonl: cannot write"):
        resolve_data(load_config(None, [f"output_dir={tmp_path}", "train.storage_path=s3://no-such-bucket/runs",
                                        "train.name=gen"]))


def test_processes_loading_one_model_from_a_bucket_share_one_download(s3, tiny_model_dir, tmp_path):
    """The workers of a node start together and each loads model.name=s3://...: one copies it, the others wait
    and use that copy (before, each copied it and one's swap could delete the folder another was loading)."""
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    pafs.copy_files(str(tiny_model_dir), f"{BUCKET}/models/tiny", destination_filesystem=fs)
    env = {**os.environ, **s3["env"], "SFT_RAY_CACHE": str(tmp_path / "cache")}
    go = tmp_path / "go"
    # each process imports everything, says it is ready, and waits for the others: the loads start together
    code = ("import logging, os, sys, time, pyarrow.fs; from sft_ray.modeling import resolve_model_path; "
            "from transformers import AutoConfig; logging.basicConfig(level=logging.INFO); "
            "open(sys.argv[2] + '.ready-' + str(os.getpid()), 'w').close()\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
            "p = resolve_model_path(sys.argv[1]); AutoConfig.from_pretrained(p); print('PATH=' + p)")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"s3://{BUCKET}/models/tiny", str(go)], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    deadline = time.time() + 180
    while len(list(tmp_path.glob("go.ready-*"))) < len(procs) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-1500:] for p in procs]
        time.sleep(0.1)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    paths = {line for o, _ in outs for line in o.splitlines() if line.startswith("PATH=")}
    assert len(paths) == 1, paths
    models = [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]
    assert len(models) == 1 and (models[0] / "config.json").is_file()  # one copy, no leftover partial folders
    assert sum("downloaded s3://" in e for _, e in outs) == 1, [e[-500:] for _, e in outs]
