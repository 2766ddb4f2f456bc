"""The embedded default (SmolLM2-135M-Instruct) behind the Serve endpoint: a real answer, and a client
that hangs up mid-stream frees its slot long before the generation would have finished."""

import time

import httpx
import openai
import pytest

from sft_ray.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
PORT = 8124


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from sft_ray.serve import start

    url = start("embedded", load_config(None, [f"serve.port={PORT}", "serve.model_name=smol"]))
    yield url
    serve.shutdown()


def test_embedded_answers(server):
    client = openai.OpenAI(base_url=server, api_key="unused")
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Calculate 1+1-1"}],
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content.strip() and r.usage.completion_tokens <= 24


def test_client_disconnect_frees_the_stream(server):
    health = f"{server}/stats"  # the replica's counters (no API key configured here)
    t0 = time.time()
    with httpx.stream("POST", f"{server}/chat/completions",
                      json={"model": "smol", "stream": True, "max_tokens": 400, "temperature": 0,
                            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]},
                      timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(health).json()["active_streams"] == 1
    # 400 tokens take this CPU well over 10 s; the slot must be free long before that
    deadline = time.time() + 8
    while time.time() < deadline and httpx.get(health).json()["active_streams"] != 0:
        time.sleep(0.1)
    state = httpx.get(health).json()
    assert state["active_streams"] == 0 and state["cancelled_streams"] == 1, state
    assert time.time() - t0 < 12
