"""The Serve app on local Ray, called with the real openai client (sync and async) and raw HTTP."""

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from sft_ray.config import load_config

KEY = "sk-test-not-a-real-key-123"
PORT = 8123


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir):
    from ray import serve

    from sft_ray.serve import start

    cfg = load_config(None, [f"serve.port={PORT}", "serve.model_name=tiny", "serve.max_tokens_limit=64",
                             "serve.default_max_tokens=16", "serve.max_body_bytes=20000"])
    url = start(str(tiny_model_dir), cfg, api_key=KEY)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tok, model


def _greedy(tok, model, ids, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def _chat_ids(tok, messages):
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def test_models_and_health(server):
    client = openai.OpenAI(base_url=server, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.removesuffix("/v1") + "/health").json() == {"status": "ok"}  # nothing else, no key
    assert httpx.get(f"{server}/stats").status_code == 401  # the counters are behind the key
    assert httpx.get(server.removesuffix("/v1") + "/openapi.json").status_code == 404  # no schema outside the key
    stats = httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["continuous_batching"] is True and stats["running"] == 0, stats


def test_a_shared_system_prompt_is_reused_and_answers_stay_generates(server, local_model):
    """The second chat with the same system prompt shows that it recurs; the later ones start from its cached KV,
    streamed or not, and each answer is still in-process ``generate``'s."""
    tok, model = local_model
    client = openai.OpenAI(base_url=server, api_key=KEY)
    system = {"role": "system", "content": "You answer questions about the weather in one sentence, politely. " * 3}
    before = httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["prefix_cache"]
    for q, stream in (("Is it raining?", False), ("Will it snow?", False), ("Is it raining?", False),
                      ("Is it windy today?", True)):
        messages = [system, {"role": "user", "content": q}]
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices)
        else:
            text = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                  temperature=0).choices[0].message.content
        assert text == _greedy(tok, model, _chat_ids(tok, messages), 10), q
    after = httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["prefix_cache"]
    assert after["prompts"] - before["prompts"] == 2 and after["tokens_reused"] - before["tokens_reused"] >= 2 * 40, \
        (before, after)


def test_chat_greedy_equals_in_process_generate(server, local_model):
    tok, model = local_model
    client = openai.OpenAI(base_url=server, api_key=KEY)
    messages = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids = _chat_ids(tok, messages)
    assert r.choices[0].message.content == _greedy(tok, model, ids, 12)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    assert 1 <= r.usage.completion_tokens <= 12 and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_and_stop(server, local_model):
    tok, model = local_model
    client = openai.OpenAI(base_url=server, api_key=KEY)
    r = client.completions.create(model="tiny", prompt="The weather today", max_tokens=10, temperature=0)
    expected = _greedy(tok, model, tok("The weather today")["input_ids"], 10)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    if len(expected) > 4:  # a stop string cuts the text there
        stop = expected[2:4]
        r2 = client.completions.create(model="tiny", prompt="The weather today", max_tokens=10, temperature=0, stop=[stop])
        assert r2.choices[0].text == expected[: expected.find(stop)] and r2.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(server):
    client = openai.OpenAI(base_url=server, api_key=KEY)
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    time.sleep(1.1)  # the replica, made before, is now seconds older than the answer
    t0 = int(time.time())
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    # every chunk carries when this answer was made (not when the replica started), as OpenAI's streams do
    assert {c.created for c in chunks} <= set(range(t0, int(time.time()) + 1)) and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert len(chunks) >= 3  # role, pieces, finish
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # raw SSE ends with [DONE]
    with httpx.stream("POST", f"{server}/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "Once", "max_tokens": 5, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_seeded_sampling_is_reproducible(server):
    client = openai.OpenAI(base_url=server, api_key=KEY)
    kw = dict(model="tiny", prompt="Random words:", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b


def test_concurrent_requests_are_batched_and_correct(server):
    prompts = [f"Item {i}: describe it" for i in range(8)]

    async def go():
        client = openai.AsyncOpenAI(base_url=server, api_key=KEY)
        sequential = [(await client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)).choices[0].text
                      for p in prompts]
        together = await asyncio.gather(*[client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                                          for p in prompts])
        return sequential, [r.choices[0].text for r in together]

    sequential, together = asyncio.run(go())
    assert together == sequential


def test_streams_share_the_running_batch_and_seeds_hold_under_load(server):
    """Streaming requests join one running batch (the replica reports several decoded together) and each still
    gets its own answer: greedy ones equal the non-streamed answer, a seeded one its answer alone."""
    prompts = [f"Story {i}: once upon a time" for i in range(6)]
    seeded = dict(model="tiny", prompt="Random words:", max_tokens=16, temperature=1.0, top_p=0.9, seed=11)

    async def go():
        client = openai.AsyncOpenAI(base_url=server, api_key=KEY)
        alone = (await client.completions.create(**seeded)).choices[0].text
        plain = [(await client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)).choices[0].text
                 for p in prompts]

        async def stream(**kw):
            text = ""
            async for chunk in await client.completions.create(stream=True, **kw):
                text += chunk.choices[0].text if chunk.choices else ""
            return text

        got = await asyncio.gather(*[stream(model="tiny", prompt=p, max_tokens=24, temperature=0) for p in prompts],
                                   stream(**seeded),
                                   *[stream(model="tiny", prompt=p, max_tokens=24, temperature=1.3) for p in prompts])
        return alone, plain, got

    alone, plain, got = asyncio.run(go())
    assert got[:6] == plain
    assert got[6] == alone
    stats = httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["most_running"] >= 4, stats


def test_vllm_backend_is_refused_without_a_gpu(tiny_model_dir):
    from sft_ray.config import ConfigError
    from sft_ray.serve import start

    with pytest.raises(ConfigError, match=r"serve.backend=vllm needs a GPU per replica; this cluster has 0 GPUs"):
        start(str(tiny_model_dir), load_config(None, ["serve.backend=vllm", "serve.port=8199"]))
    # counted for every replica it starts with, not one
    with pytest.raises(ConfigError, match=r"serve.min_replicas=3 x 2 GPU\(s\) each need 6"):
        start(str(tiny_model_dir), load_config(None, ["serve.backend=vllm", "serve.port=8199", "serve.min_replicas=3",
                                                      "serve.max_replicas=3", "serve.gpus_per_replica=2"]))


def test_auth(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong").models.list()
    r = httpx.post(f"{server}/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}, 400, "invalid_value"),
        ({"model": "tiny", "messages": "hello"}, 400, "invalid_value"),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"model": "tiny", "messages": []}, 400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400, "max_tokens_too_large"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "context_length_exceeded"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 30000}]}, 413, "request_too_large"),
        # edges a real client can send: each a 4xx that says what is wrong, never a 500
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}, 400, "invalid_value"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": ' + b"9" * 5000 + b"}", 400,
         "invalid_json"),  # Python will not read an integer of 5,000 digits: a 500 before
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
         400, "invalid_value"),  # OpenAI's limit; every streamed piece is checked against each stop string
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": "z" * 1000}, 400, "invalid_value"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
         400, "invalid_json"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_value"),
        # what this backend does not do is refused by name, not accepted and ignored
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
         400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "unsupported_parameter"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
         400, "unsupported_parameter"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         400, "unsupported_content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]},
         400, "unsupported_parameter"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high"},
         400, "unsupported_parameter"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
          "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         400, "unsupported_parameter"),
        # an option OpenAI does not have (a vendor extension, a typo) is refused by name, as OpenAI refuses it
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_k": 5}, 400, "unknown_parameter"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x", "weight": 0}]}, 400, "unknown_parameter"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream_options": {"usage": True}},
         400, "unknown_parameter"),
        # honoured options out of their range
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, 400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"50": 101}},
         400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"hello": 1}},
         400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"\u00b2": 1}},
         400, "invalid_value"),  # "²".isdigit() is true, int("²") fails
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}},
         400, "invalid_value"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/chat/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    # the replica is still serving
    ok = httpx.post(f"{server}/chat/completions", headers=headers,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    """No Content-Length (chunked transfer): the body is counted as it arrives and refused past the limit."""
    sent = []

    def body():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(100):  # 100 x 1000 bytes against serve.max_body_bytes=20000
            sent.append(1)
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(f"{server}/chat/completions", content=body(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_stream_usage_and_text_parts(server):
    """stream_options.include_usage gives the openai client its usage chunk; text content parts are joined."""
    client = openai.OpenAI(base_url=server, api_key=KEY)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                           max_tokens=6, temperature=0)
    assert plain.choices[0].message.content == full.choices[0].message.content


@pytest.mark.parametrize("extra, param", [({"echo": True}, "echo"), ({"suffix": "end"}, "suffix"),
                                          ({"best_of": 3}, "best_of")])
def test_completion_options_this_backend_lacks_are_refused(server, extra, param):
    r = httpx.post(f"{server}/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "Once", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter" and r.json()["error"]["param"] == param


def _greedy_ids(tok, model, ids, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return out[0, len(ids):].tolist()


def _model_logprobs(model, ids, generated):
    """The model's own log-probabilities of each generated token and the distribution it was drawn from."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_are_the_models_own(server, local_model):
    """Chat logprobs/top_logprobs and completions' logprobs, streamed and not, equal the model's log-softmax at
    each generated token; greedy tokens are their own most likely alternative; the tokens spell the text."""
    tok, model = local_model
    client = openai.OpenAI(base_url=server, api_key=KEY)
    messages = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens and entries
    ids = _chat_ids(tok, messages)
    generated = _greedy_ids(tok, model, ids, 10)[:len(entries)]
    expected = _model_logprobs(model, ids, generated)
    for k, e in enumerate(entries):
        assert e.token == tok.decode([generated[k]]), (k, e.token)
        assert abs(e.logprob - float(expected[k, generated[k]])) < 1e-3, (k, e.logprob)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the argmax
        assert [round(t.logprob, 4) for t in e.top_logprobs] == \
            [round(float(v), 4) for v in torch.topk(expected[k], 3).values]
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token or "\ufffd" in e.token
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8") == r.choices[0].message.content
    # the same entries arrive in pieces with the stream
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    # without logprobs asked, none are sent
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=3).choices[0].logprobs is None

    prompt = "The weather today"
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == c.usage.completion_tokens
    assert lp.text_offset[0] == len(prompt) and all(len(t) == 2 for t in lp.top_logprobs)
    pids = tok(prompt)["input_ids"]
    expected = _model_logprobs(model, pids, _greedy_ids(tok, model, pids, 8)[:len(lp.tokens)])
    assert max(abs(a - float(b)) for a, b in zip(lp.token_logprobs, expected.max(dim=-1).values)) < 1e-3
    r6 = httpx.post(f"{server}/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "tiny", "prompt": "Once", "max_tokens": 2, "logprobs": 6})
    assert r6.status_code == 400 and r6.json()["error"]["param"] == "logprobs"


def _reference_ids(model, ids, n, presence, frequency, bias):
    """OpenAI's rule written out: logit_bias added, each generated token lowered by frequency x count + presence."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float().clone()
        for t, b in bias.items():
            logits[t] += b
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(torch.argmax(logits)))
    return out


def test_penalties_logit_bias_and_the_other_fields_clients_send(server, local_model):
    """presence/frequency penalties and logit_bias are honoured (the reference loop's tokens, streamed and not);
    ``developer`` is ``system``; fields with no effect on the answer (user, metadata, store, service_tier) and a
    message sent back as the openai client parsed it are accepted."""
    tok, model = local_model
    client = openai.OpenAI(base_url=server, api_key=KEY)
    messages = [{"role": "user", "content": "Name three colours."}]
    ids = _chat_ids(tok, messages)
    bias = {tok(" blue", add_special_tokens=False)["input_ids"][0]: 4.0}
    kw = dict(model="tiny", messages=messages, max_tokens=10, temperature=0, presence_penalty=0.6,
              frequency_penalty=1.2, logit_bias={str(k): v for k, v in bias.items()})
    r = client.chat.completions.create(**kw)
    want = _reference_ids(model, ids, 10, 0.6, 1.2, bias)
    want = want[:want.index(tok.eos_token_id)] if tok.eos_token_id in want else want
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].message.content != tok.decode(_greedy_ids(tok, model, ids, 10), skip_special_tokens=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == r.choices[0].message.content

    system = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, *messages])
    developer = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, user="u-1",
                                               metadata={"run": "test"}, store=False, service_tier="auto",
                                               extra_body={"prompt_cache_key": "k-1", "safety_identifier": "s-1"},
                                               messages=[{"role": "developer", "content": "Be brief."}, *messages])
    assert developer.choices[0].message.content == system.choices[0].message.content
    again = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                           messages=[*messages, system.choices[0].message,
                                                     {"role": "user", "content": "And one more?"}])
    assert again.choices[0].finish_reason in ("stop", "length")


def test_a_stop_string_split_across_streamed_pieces_is_never_sent(server, local_model):
    """The stream holds back text that may begin a stop string: a stop that spans two tokens gives the same text,
    usage and log-probabilities streamed as not; a vanishing temperature is answered greedily."""
    from itertools import accumulate

    tok, model = local_model
    client = openai.OpenAI(base_url=server, api_key=KEY)
    messages = [{"role": "user", "content": "Name three colours."}]
    # penalties: the tiny random model's greedy answer is one token repeated; these make it varied
    base = dict(model="tiny", messages=messages, max_tokens=16, temperature=0, presence_penalty=2.0,
                frequency_penalty=2.0)
    ref = client.chat.completions.create(**base, logprobs=True)
    full_text = ref.choices[0].message.content
    toks = [e.token for e in ref.choices[0].logprobs.content]
    assert "".join(toks) == full_text, (toks, full_text)
    ends = list(accumulate(len(t) for t in toks))

    def spanning(k):  # the last character of token k-1 and the first of token k, found there first
        cut = ends[k - 1]
        stop = full_text[cut - 1:cut + 1]
        ok = toks[k - 1] and toks[k] and len(stop) == 2 and full_text.find(stop) == cut - 1
        return (cut, stop) if ok else None

    cut, stop = next(filter(None, (spanning(k) for k in range(1, len(toks)))))
    kw = dict(base, stop=[stop], logprobs=True)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content == full_text[:cut - 1] and whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content, (streamed, whole.choices[0].message.content, stop)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    entries = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries == [e.token for e in whole.choices[0].logprobs.content]

    ids = _chat_ids(tok, messages)
    tiny_t = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1e-40)
    assert tiny_t.choices[0].message.content == tok.decode(_greedy_ids(tok, model, ids, 6), skip_special_tokens=True)


def test_every_field_this_backend_does_not_do_is_refused_by_its_name(server):
    """README: refused by name, not accepted and ignored (one request each, then the replica still answers)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    base = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    fields = {"audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
              "verbosity": "low", "web_search_options": {}, "tool_choice": "auto",
              "functions": [{"name": "f", "parameters": {}}], "function_call": "auto"}
    for name, value in fields.items():
        r = httpx.post(f"{server}/chat/completions", headers=headers, json={**base, name: value})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", (name, r.text)
        assert r.json()["error"]["param"] == ("tools" if name == "functions" else name), (name, r.text)
    for name, value in {"echo": True, "suffix": "end", "best_of": 2}.items():  # the completions endpoint's own
        r = httpx.post(f"{server}/completions", headers=headers,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 2, name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
    assert httpx.post(f"{server}/chat/completions", headers=headers, json=base).status_code == 200


def test_an_answer_leaves_the_batch_at_its_stop_string_and_null_options_are_defaults(server, local_model):
    """Non-streaming with a stop string: the row stops being decoded when the text reaches it (it used to run on
    to max_tokens and only then be cut). ``null`` for an option is its default, as in OpenAI's API."""
    headers = {"Authorization": f"Bearer {KEY}"}
    base = {"model": "tiny", "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0}
    free = httpx.post(f"{server}/chat/completions", headers=headers, json={**base, "max_tokens": 6}).json()
    text = free["choices"][0]["message"]["content"]
    assert len(text) >= 3, text
    decoded = httpx.get(f"{server}/stats", headers=headers).json()["decoded_tokens"]
    stopped = httpx.post(f"{server}/chat/completions", headers=headers,
                         json={**base, "max_tokens": 64, "stop": [text[1:3]]}).json()
    assert "choices" in stopped, stopped
    got = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop" and text.strip().startswith(got.strip()), (got, text)
    spent = httpx.get(f"{server}/stats", headers=headers).json()["decoded_tokens"] - decoded
    assert spent <= 6, spent  # not 64
    nulls = httpx.post(f"{server}/chat/completions", headers=headers,
                       json={**base, "max_tokens": 6, "temperature": None, "top_p": None, "n": None, "stream": None,
                             "presence_penalty": None, "frequency_penalty": None})
    assert nulls.status_code == 200, nulls.text
