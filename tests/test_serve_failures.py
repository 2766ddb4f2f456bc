"""A model that fails while generating, served for real: a stream that has already sent its 200 ends with an
OpenAI-style error event (the openai client raises it as an APIError with the server's message) instead of a
connection cut mid-body; a non-streaming answer is a well-formed 500; the replica keeps serving."""

import httpx
import openai
import pytest
import torch

from sft_ray.config import load_config

PORT = 8131


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a NaN final norm: every logit is NaN, so sampling (torch.multinomial) raises, in the
    continuous batcher's forward loop, as a real fault would; greedy decoding still picks a token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("nan-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(ray_local, nan_model_dir):
    from ray import serve

    from sft_ray.serve import start

    cfg = load_config(None, [f"serve.port={PORT}", "serve.model_name=broken", "serve.default_max_tokens=8"])
    url = start(str(nan_model_dir), cfg)
    yield url
    serve.shutdown()


def test_a_failure_mid_stream_is_an_error_event_and_the_replica_keeps_serving(server):
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(2):  # and again: the batcher that failed is still running
        stream = client.chat.completions.create(model="broken", messages=messages, max_tokens=4, temperature=1.0,
                                                stream=True)
        with pytest.raises(openai.APIError) as e:
            list(stream)
        assert not isinstance(e.value, openai.APIConnectionError), e.value  # an event, not a cut connection
        assert "generating this answer failed on the server" in str(e.value), e.value
        assert e.value.body["code"] == "internal_error" and e.value.body["type"] == "server_error", e.value.body

    # raw: the role chunk the stream had sent, then the error event and [DONE]; the body ends cleanly
    with httpx.stream("POST", f"{server}/chat/completions", timeout=60,
                      json={"model": "broken", "messages": messages, "max_tokens": 4, "temperature": 1.0,
                            "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"role":"assistant"' in events[0] and '"error"' in events[-2] and events[-1] == "data: [DONE]", events

    # non-streaming: a well-formed 500 with the OpenAI error body
    r = httpx.post(f"{server}/chat/completions", timeout=60,
                   json={"model": "broken", "messages": messages, "max_tokens": 4, "temperature": 1.0})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text

    # greedy decoding does not sample: the same replica answers
    ok = client.chat.completions.create(model="broken", messages=messages, max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")

    # the three failed streams are counted as failed, not as clients that went away
    stats = httpx.get(f"{server}/stats", timeout=10).json()
    assert (stats["failed_streams"], stats["cancelled_streams"], stats["active_streams"]) == (3, 0, 0), stats
