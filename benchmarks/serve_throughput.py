"""Serve throughput: the Ray Serve endpoint at concurrency 1, 4, 8 and 16 (async openai client; non-streaming,
streaming, and half of each) against what the same model does in one process, same prompts, same max_tokens,
in one run.

    .venv/bin/python benchmarks/serve_throughput.py [--model embedded] [--requests 48] [--max-tokens 16]

In-process baselines, greedy, 2 threads: ``generate`` one request at a time; ``generate`` on batches of 8 (what
the hardware does when the prompts are known together: the static-batching figure); the engine's continuous
batcher with 8 requests submitted together; transformers' own continuous batching (``generate_batch``, paged
attention) on the same 8; the batcher runs with its prefix cache, as served, and without it (the prompts share
their system prompt and task instructions). Then the endpoint (12 setups of ``--requests`` each), and the endpoint
at concurrency 8 with ``serve.continuous_batching=false`` and with ``serve.prefix_cache_tokens=0``. Last line: JSON
with ``ratio_c8_vs_inprocess_batched``, ``ratio_c8_vs_inprocess_sequential`` (generated tokens/s, non-streaming),
``ratio_c8_stream_vs_nonstream``, the prefix cache's on/off ratio and TTFT, every setup's ratio to the in-process batch of 8, and the error count (must be 0).
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts(n: int) -> list[list[dict]]:
    from sft_ray import synthetic

    rows = synthetic.generate(n, seed=123, split="eval")
    return [[m for m in r["messages"] if m["role"] == "user"] for r in rows]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def in_process(model_dir: str, convs: list[list[dict]], max_tokens: int, threads: int) -> dict:
    """The four in-process setups on the same prompts (their greedy text is compared: it must be the same)."""
    import torch
    from transformers import GenerationConfig

    from sft_ray.serve import Engine, GenRequest

    torch.set_num_threads(threads)
    static = Engine(model_dir, continuous=False)
    cont = Engine(model_dir, continuous=True)
    cont_off = Engine(model_dir, continuous=True, prefix_cache_tokens=0)
    reqs = [GenRequest(static.chat_ids(c), max_tokens, 0.0, 1.0, (), None) for c in convs]
    out: dict[str, dict] = {}

    def record(name, t0, lat, results):
        wall = time.time() - t0
        toks = sum(r.completion_tokens for r in results)
        out[name] = {"requests": len(results), "errors": 0, "req_per_s": len(results) / wall,
                     "tokens_per_s": toks / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
                     "ttft_p50_s": float("nan"), "ttft_p95_s": float("nan"), "texts": [r.text for r in results]}

    t0, lat, res = time.time(), [], []
    for r in reqs:
        s = time.time()
        res += static.generate([r])
        lat.append(time.time() - s)
    record("in_process_sequential", t0, lat, res)
    t0, lat, res = time.time(), [], []
    for i in range(0, len(reqs), 8):
        s = time.time()
        res += static.generate(reqs[i:i + 8])
        lat += [time.time() - s] * len(reqs[i:i + 8])
    record("in_process_batch8", t0, lat, res)
    for name, eng in (("in_process_continuous8", cont), ("in_process_continuous8_noprefix", cont_off)):
        t0, lat, res = time.time(), [], []
        for i in range(0, len(reqs), 8):
            s = time.time()
            res += eng.generate(reqs[i:i + 8])  # submitted together: prefilled together, decoded as one batch
            lat += [time.time() - s] * len(reqs[i:i + 8])
        record(name, t0, lat, res)
    gc = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(static.eos_ids),
                          pad_token_id=static.tok.pad_token_id)
    t0, lat, res = time.time(), [], []
    for i in range(0, len(reqs), 8):
        s = time.time()
        got = static.model.generate_batch(inputs=[r.input_ids for r in reqs[i:i + 8]], generation_config=gc)
        lat += [time.time() - s] * len(reqs[i:i + 8])
        for k, r in zip(sorted(got, key=lambda k: int(k.rsplit("_", 1)[-1])), reqs[i:i + 8]):
            res.append(static._finish(r, list(got[k].generated_tokens)))
    record("transformers_cb8", t0, lat, res)
    ref = out["in_process_sequential"]["texts"]
    same = {k: v.pop("texts") == ref for k, v in out.items()}
    return out, same


async def endpoint(url: str, convs: list[list[dict]], conc: int, max_tokens: int, stream: str) -> dict:
    """``stream``: "no", "yes", or "mix" (every other request streams)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(conc)
    lat, ttft, toks, errors = [], [], 0, 0

    async def one(i, c):
        nonlocal toks, errors
        async with sem:
            s = time.time()
            try:
                if stream == "no" or (stream == "mix" and i % 2 == 0):
                    r = await client.chat.completions.create(model="bench", messages=c, max_tokens=max_tokens,
                                                             temperature=0)
                    toks += r.usage.completion_tokens
                else:
                    it = await client.chat.completions.create(model="bench", messages=c, max_tokens=max_tokens,
                                                              temperature=0, stream=True,
                                                              stream_options={"include_usage": True})
                    first = None
                    async for chunk in it:
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.time() - s
                        if chunk.usage:
                            toks += chunk.usage.completion_tokens
                    if first is not None:
                        ttft.append(first)
                lat.append(time.time() - s)
            except Exception:
                errors += 1

    t0 = time.time()
    await asyncio.gather(*[one(i, c) for i, c in enumerate(convs)])
    wall = time.time() - t0
    return {"requests": len(convs), "errors": errors, "req_per_s": len(convs) / wall, "tokens_per_s": toks / wall,
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=48, help="per endpoint setup (12 setups, plus 4 at c8)")
    ap.add_argument("--baseline-requests", type=int, default=16, help="per in-process setup (5 setups)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPU threads for the replica and for the baselines")
    ap.add_argument("--port", type=int, default=8130)
    a = ap.parse_args()

    import httpx
    from ray import serve

    from sft_ray.config import load_config
    from sft_ray.modeling import resolve_model_path
    from sft_ray.serve import start

    model_dir = resolve_model_path(a.model)
    convs = prompts(a.requests)
    results, same_text = in_process(model_dir, convs[: a.baseline_requests], a.max_tokens, a.cpus)
    base = [f"serve.port={a.port}", "serve.model_name=bench", f"serve.cpus_per_replica={a.cpus}"]
    # (name suffix, overrides, streams, concurrencies): the full grid as configured by default, then at c8 only
    # continuous batching off (@serve.batch) and the prefix cache off
    variants = [("", [], ("no", "yes", "mix"), (1, 4, 8, 16)),
                ("_static", ["serve.continuous_batching=false"], ("no", "yes"), (8,)),
                ("_noprefix", ["serve.prefix_cache_tokens=0"], ("no", "yes"), (8,))]
    for suffix, overrides, streams, concs in variants:
        url = start(model_dir, load_config(None, [*base, *overrides]))
        try:
            asyncio.run(endpoint(url, convs[:8], 8, a.max_tokens, "no"))  # warm-up
            for stream in streams:
                for conc in concs:
                    key = f"endpoint{suffix}_{dict(no='', yes='stream_', mix='mix_')[stream]}c{conc}"
                    results[key] = asyncio.run(endpoint(url, convs, conc, a.max_tokens, stream))
                    results[key]["max_running"] = httpx.get(f"{url}/stats").json()["most_running"]  # so far
        finally:
            serve.shutdown()
    print(f"{'setup':26s} {'req':>5s} {'err':>4s} {'req/s':>7s} {'tok/s':>7s} {'p50 s':>7s} {'p95 s':>7s} "
          f"{'ttft50':>7s} {'ttft95':>7s} {'maxrun':>6s}")
    for k, r in results.items():
        print(f"{k:26s} {r['requests']:5d} {r['errors']:4d} {r['req_per_s']:7.2f} {r['tokens_per_s']:7.1f} "
              f"{r['p50_s']:7.2f} {r['p95_s']:7.2f} {r['ttft_p50_s']:7.2f} {r['ttft_p95_s']:7.2f} "
              f"{str(r.get('max_running', '-')):>6}")
    tps = {k: r["tokens_per_s"] for k, r in results.items()}
    print(json.dumps({
        "ratio_c8_vs_inprocess_batched": round(tps["endpoint_c8"] / tps["in_process_batch8"], 3),
        "ratio_c8_vs_inprocess_sequential": round(tps["endpoint_c8"] / tps["in_process_sequential"], 3),
        "ratio_c8_stream_vs_nonstream": round(tps["endpoint_stream_c8"] / tps["endpoint_c8"], 3),
        "ttft_p50_c8_stream_s": round(results["endpoint_stream_c8"]["ttft_p50_s"], 3),
        "ttft_p50_c8_stream_prefix_cache_off_s": round(results["endpoint_noprefix_stream_c8"]["ttft_p50_s"], 3),
        "ratio_c8_prefix_cache_on_vs_off": round(tps["endpoint_c8"] / tps["endpoint_noprefix_c8"], 3),
        "ratio_vs_in_process_batch8": {k: round(v / tps["in_process_batch8"], 3) for k, v in tps.items()},
        "same_greedy_text_as_sequential": same_text, "endpoint_requests": sum(
            r["requests"] for k, r in results.items() if k.startswith("endpoint")),
        "errors": sum(r["errors"] for r in results.values()), "max_tokens": a.max_tokens, "cpus": a.cpus}))


if __name__ == "__main__":
    main()
