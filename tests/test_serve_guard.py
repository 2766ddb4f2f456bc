"""The guard that vLLM's app gets in front of ray.serve.llm's ingress (``serve/guard.py``), in a real Serve app on
local Ray: vLLM needs a GPU, so the ingress here is a FastAPI app that echoes what reaches it, built the way
``deploy.build_vllm`` builds its own (the middleware added to the ingress's app, the app given to Serve)."""

import json

import httpx
import pytest
from fastapi import FastAPI, Request

from sft_ray.config import ConfigError, ServeConfig
from sft_ray.serve.deploy import app_builder, guard_options
from sft_ray.serve.guard import Guard

KEY = "sk-guard-test-not-a-real-key"
PORT = 8127


def _echo_app(opts):
    from ray import serve

    app = FastAPI()
    app.add_middleware(Guard, **opts)

    @serve.deployment
    @serve.ingress(app)
    class Echo:
        @app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict:
            body = await request.body()
            return {"body": body.decode(), "length": request.headers.get("content-length")}

        @app.get("/v1/models")
        async def models(self) -> dict:
            return {"data": []}

        @app.get("/health")
        async def health(self) -> dict:
            return {"status": "ok"}

    return Echo.bind()


@pytest.fixture(scope="module")
def url(ray_local):
    from ray import serve

    cfg = ServeConfig(max_tokens_limit=64, default_max_tokens=16, max_body_bytes=20000)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(_echo_app(guard_options(cfg, KEY)), name="guard-test", route_prefix="/")
    serve.run(_echo_app(guard_options(cfg, KEY)), name="guard-test-prefixed", route_prefix="/llm")
    yield f"http://127.0.0.1:{PORT}"
    serve.shutdown()


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_the_key_is_required_except_for_health(url):
    assert httpx.get(f"{url}/health").status_code == 200
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": "m"}).status_code == 401


def test_a_request_within_the_limits_reaches_the_app_unchanged(url):
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo"}], "max_tokens": 8}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["body"].encode() == raw


def test_a_request_without_max_tokens_gets_the_default(url):
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={"model": "m", "messages": []})
    sent = json.loads(r.json()["body"])
    assert sent["max_tokens"] == 16 and int(r.json()["length"]) == len(r.json()["body"].encode())


def test_the_rules_hold_under_a_route_prefix(url):
    assert httpx.get(f"{url}/llm/health").status_code == 200
    assert httpx.get(f"{url}/llm/v1/models").status_code == 401
    r = httpx.post(f"{url}/llm/v1/chat/completions", headers=AUTH, json={"model": "m", "messages": []})
    assert json.loads(r.json()["body"])["max_tokens"] == 16
    r = httpx.post(f"{url}/llm/v1/chat/completions", headers=AUTH, json={"model": "m", "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"


@pytest.mark.parametrize("body, status, code", [
    ({"model": "m", "max_tokens": 65}, 400, "max_tokens_too_large"),
    ({"model": "m", "max_completion_tokens": 1000}, 400, "max_tokens_too_large"),
    ({"model": "m", "max_tokens": "100000"}, 400, "invalid_value"),  # vLLM's lax parsing would read it as 100000
    ({"model": "m", "max_tokens": 100000.0}, 400, "invalid_value"),
    ({"model": "m", "x": "y" * 30000}, 413, "request_too_large"),
    (b'{"model": "m", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "invalid_json"),
    (b'{"model": "m", "seed": ' + b"9" * 5000 + b"}", 400, "invalid_json"),  # passed on unread before
    # max_tokens bounds one answer; n, best_of and a list of prompts multiply it
    ({"model": "m", "max_tokens": 8, "n": 1000}, 400, "invalid_value"),
    ({"model": "m", "max_tokens": 8, "best_of": 200}, 400, "invalid_value"),
    ({"model": "m", "max_tokens": 8, "prompt": ["p"] * 17}, 400, "invalid_value"),
    ({"model": "m", "max_tokens": 8, "n": "4"}, 400, "invalid_value"),
])
def test_what_the_guard_refuses(url, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_a_chunked_body_over_the_limit_is_cut_off_as_it_arrives(url):
    sent = []

    def body():
        for _ in range(100):  # 100 x 1000 bytes against max_body_bytes=20000, no Content-Length
            sent.append(1)
            yield b"x" * 1000

    r = httpx.post(f"{url}/v1/chat/completions", content=body(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/health").status_code == 200  # the replica is still serving


def test_the_vllm_config_file_path_fails_closed_then_refuses_a_cpu_cluster(ray_local, tiny_model_dir, monkeypatch):
    """``serve deploy`` with backend: vllm: an unset key variable stops the build before anything else; with the
    key set, a cluster without GPUs is refused with the count."""
    monkeypatch.delenv("SFT_RAY_GUARD_TEST_KEY", raising=False)
    args = {"model_dir": str(tiny_model_dir), "backend": "vllm", "api_key_env": "SFT_RAY_GUARD_TEST_KEY"}
    with pytest.raises(ConfigError, match="SFT_RAY_GUARD_TEST_KEY"):
        app_builder(args)
    monkeypatch.setenv("SFT_RAY_GUARD_TEST_KEY", KEY)
    with pytest.raises(ConfigError, match=r"needs a GPU per replica; this cluster has 0 GPUs"):
        app_builder(args)


def test_only_a_hash_of_the_key_travels_with_the_app(tiny_model_dir):
    """What Serve ships to the replicas (and keeps in its config) holds the key's SHA-256, never the key."""
    import hashlib

    import ray.cloudpickle as cloudpickle

    from sft_ray.serve.deploy import build

    digest = hashlib.sha256(KEY.encode()).hexdigest().encode()
    for shipped in (build(str(tiny_model_dir), ServeConfig(), api_key=KEY), guard_options(ServeConfig(), KEY)):
        blob = cloudpickle.dumps(shipped)
        assert KEY.encode() not in blob and digest in blob
