"""Serve throughput: the Ray Serve endpoint at concurrency 1, 4, 8 (async openai client) against in-process
sequential generation, same model, same prompts, same max_tokens, in one run.

    .venv/bin/python benchmarks/serve_throughput.py [--model embedded] [--requests 200] [--max-tokens 16]

Non-streaming requests measure throughput and latency (they are what @serve.batch batches); time to first
token is measured on separate streaming requests at each concurrency. Last line: JSON with the ratio of
concurrency-8 generated tokens/s to in-process sequential tokens/s.
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
    import torch

    from sft_ray.serve import Engine, GenRequest

    torch.set_num_threads(threads)
    eng = Engine(model_dir)
    lat, toks = [], 0
    t0 = time.time()
    for c in convs:
        s = time.time()
        r = eng.generate([GenRequest(eng.chat_ids(c), max_tokens, 0.0, 1.0, (), None)])[0]
        lat.append(time.time() - s)
        toks += r.completion_tokens
    wall = time.time() - t0
    return {"requests": len(convs), "errors": 0, "req_per_s": len(convs) / wall, "tokens_per_s": toks / wall,
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "ttft_p50_s": pct(lat, 0.5)}


async def endpoint(url: str, convs: list[list[dict]], conc: int, max_tokens: int, ttft_requests: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(conc)
    lat, toks, errors = [], 0, 0

    async def one(c):
        nonlocal toks, errors
        async with sem:
            s = time.time()
            try:
                r = await client.chat.completions.create(model="bench", messages=c, max_tokens=max_tokens,
                                                         temperature=0)
                toks += r.usage.completion_tokens
                lat.append(time.time() - s)
            except Exception:
                errors += 1

    t0 = time.time()
    await asyncio.gather(*[one(c) for c in convs])
    wall = time.time() - t0
    ttft = []

    async def first_token(c):
        async with sem:
            s = time.time()
            stream = await client.chat.completions.create(model="bench", messages=c, max_tokens=max_tokens,
                                                          temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft.append(time.time() - s)
                    break
            await stream.close()

    await asyncio.gather(*[first_token(c) for c in convs[:ttft_requests]])
    return {"requests": len(convs), "errors": errors, "req_per_s": len(convs) / wall, "tokens_per_s": toks / wall,
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "ttft_p50_s": pct(ttft, 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=168, help="per concurrency level (3 levels: 504 in all)")
    ap.add_argument("--baseline-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPU threads for the replica and for the baseline")
    ap.add_argument("--port", type=int, default=8130)
    a = ap.parse_args()

    import httpx
    from ray import serve

    from sft_ray.config import load_config
    from sft_ray.modeling import resolve_model_path
    from sft_ray.serve import start

    model_dir = resolve_model_path(a.model)
    convs = prompts(a.requests)
    results = {"in_process_sequential": in_process(model_dir, convs[: a.baseline_requests], a.max_tokens, a.cpus)}
    cfg = load_config(None, [f"serve.port={a.port}", "serve.model_name=bench", f"serve.cpus_per_replica={a.cpus}",
                             "serve.max_batch_size=8"])
    url = start(model_dir, cfg)
    try:
        asyncio.run(endpoint(url, convs[:8], 8, a.max_tokens, 0))  # warm-up
        health = url.removesuffix("/v1") + "/health"
        for conc in (1, 4, 8):
            h0 = httpx.get(health).json()
            results[f"endpoint_c{conc}"] = asyncio.run(endpoint(url, convs, conc, a.max_tokens, 16))
            h = httpx.get(health).json()
            results[f"endpoint_c{conc}"]["mean_batch"] = (h["batched_requests"] - h0["batched_requests"]) / max(
                1, h["batches"] - h0["batches"])
    finally:
        serve.shutdown()
    print(f"{'setup':24s} {'req':>5s} {'err':>4s} {'req/s':>7s} {'tok/s':>7s} {'p50 s':>7s} {'p95 s':>7s} "
          f"{'ttft50':>7s} {'batch':>6s}")
    for k, r in results.items():
        print(f"{k:24s} {r['requests']:5d} {r['errors']:4d} {r['req_per_s']:7.2f} {r['tokens_per_s']:7.1f} "
              f"{r['p50_s']:7.2f} {r['p95_s']:7.2f} {r['ttft_p50_s']:7.2f} {r.get('mean_batch', 1):6.2f}")
    total = sum(r["requests"] for k, r in results.items() if k.startswith("endpoint"))
    errors = sum(r["errors"] for r in results.values())
    base = results["in_process_sequential"]["tokens_per_s"]
    print(json.dumps({"ratio_c8_vs_inprocess": round(results["endpoint_c8"]["tokens_per_s"] / base, 3),
                      "ratio_c4_vs_inprocess": round(results["endpoint_c4"]["tokens_per_s"] / base, 3),
                      "ratio_c1_vs_inprocess": round(results["endpoint_c1"]["tokens_per_s"] / base, 3),
                      "endpoint_requests": total, "errors": errors, "max_tokens": a.max_tokens, "cpus": a.cpus}))


if __name__ == "__main__":
    main()
