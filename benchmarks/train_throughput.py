"""Training throughput against plain TRL, like with like, measured side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py [rows=256] [seed_rows=64] [probe_rows=48] [zero_rows=32]
                                                    [sft_ray_overrides='a=1 b=2']

Legs (same model, the embedded SmolLM2-135M-Instruct; same generated rows; one epoch each):
- ``trl_seed``: the seed lessons' script: TRL on the chat rows with TRL's defaults (bf16 autocast, loss on
  every token), lr 8e-5, batch 1 x accumulation 8, no gradient checkpointing; on ``seed_rows`` rows (a rate).
- ``trl_best``: the strongest fair plain-TRL leg: the very rows and loss masks sft-ray trains on
  (pre-tokenized ``input_ids``/``labels``), the same rows per optimizer step, and the fastest of
  {fp32, bf16} x {padded, TRL's ``padding_free``}, chosen by a short probe of each in this run.
- ``sft_ray``: ``jobs/configs/local-cpu.yaml`` as shipped (2 Ray workers, DeepSpeed, packing).

Loop tokens/s = non-pad tokens over the training loop (first step to last; both sides). Wall = the whole
process: imports, model load, data preparation (and Ray start, validation, export for sft-ray; saving the
model for TRL). Then sft-ray alone at ZeRO-0, 2 and 3 for peak memory per worker. The last line is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, pretokenize, sft_ray_leg, spawn, trl_leg  # noqa: E402

SEED = {"learning_rate": 8e-5, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
        "gradient_checkpointing": False}  # precision: TRL's default (bf16 autocast)


def fair_candidates(rows_per_step: int) -> dict[str, dict]:
    base = {"learning_rate": 1e-4, "per_device_train_batch_size": rows_per_step, "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False}
    # TRL refuses padding_free without packing unless max_length=None: the rows are pre-tokenized and already
    # cut to the shipped data.max_length, so nothing is left to enforce
    return {f"{prec}_{layout}": {**base, "bf16": prec == "bf16", "padding_free": layout == "padding_free",
                                 **({"max_length": None} if layout == "padding_free" else {})}
            for prec in ("fp32", "bf16") for layout in ("padded", "padding_free")}


def main(argv: list[str]) -> None:
    opts = {"rows": "256", "seed_rows": "64", "probe_rows": "48", "zero_rows": "32", "sft_ray_overrides": ""}
    for a in argv:
        k, _, v = a.partition("=")
        if k not in opts:
            raise SystemExit(f"unknown option {k!r}; options: {', '.join(opts)}")
        opts[k] = v
    from sft_ray.config import load_config
    from sft_ray.modeling import embedded_model_dir
    from sft_ray.synthetic import write_task

    embedded_model_dir()  # built once, outside every timed leg
    overrides = opts["sft_ray_overrides"].split()
    shipped = load_config(ROOT / "jobs/configs/local-cpu.yaml", overrides)
    rows_per_step = shipped.train.num_workers * shipped.train.per_device_batch_size * shipped.train.grad_accum
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    train, _ = write_task(work, int(opts["rows"]), 1, seed=42)
    tokenized = pretokenize(str(train), str(work / "tokenized.jsonl"), shipped.data.max_length)
    probe = work / "probe.jsonl"
    probe.write_text("".join(open(tokenized).readlines()[: int(opts["probe_rows"])]))
    seed_data = work / "seed.jsonl"
    seed_data.write_text("".join(open(train).readlines()[: int(opts["seed_rows"])]))

    results: dict[str, dict] = {}
    probes = {}
    for name, args in fair_candidates(rows_per_step).items():  # the best plain-TRL layout, measured here
        probes[name] = spawn(__file__, "trl", json.dumps(args), str(probe))
        print(f"probe {name:20} {probes[name]['tokens_per_s']:8.1f} tokens/s", flush=True)
    best = max(probes, key=lambda k: probes[k]["tokens_per_s"])
    results["trl_seed"] = spawn(__file__, "trl", json.dumps(SEED), str(seed_data))
    results["trl_best"] = spawn(__file__, "trl", json.dumps(fair_candidates(rows_per_step)[best]), tokenized)
    results["trl_best"]["layout"] = best
    results["sft_ray"] = spawn(__file__, "sft_ray", str(train), *overrides)

    print(f"\n{opts['rows']} generated rows (trl_seed: {opts['seed_rows']}), one epoch each, embedded "
          f"SmolLM2-135M-Instruct, {os.cpu_count()} CPUs; {rows_per_step} rows per optimizer step for trl_best and "
          f"sft_ray; trl_best = {best} (probe: " + ", ".join(f"{k} {v['tokens_per_s']:.0f}" for k, v in probes.items())
          + " tokens/s)")
    print(f"{'run':10} {'tokens':>7} {'steps':>5} {'tokens/s':>9} {'train s':>8} {'wall s':>7} "
          f"{'peak RSS MiB per process':>26}  loss first -> last")
    for name, r in results.items():
        first = f"{r['first_loss']:.3f}" if r["first_loss"] is not None else "  -  "
        print(f"{name:10} {r['tokens']:7d} {r['steps']:5d} {r['tokens_per_s']:9.1f} {r['train_s']:8.1f} "
              f"{r['wall_s']:7.1f} {str(r['peak_rss_mib']):>26}  {first} -> {r['last_loss']:.3f}")
    print(f"sft-ray config: {results['sft_ray']['config']}")

    mem = {}
    zero_train, _ = write_task(work / "zero", int(opts["zero_rows"]), 1, seed=7)
    for stage in (0, 2, 3):
        r = spawn(__file__, "sft_ray", str(zero_train), f"deepspeed.zero_stage={stage}", "train.num_workers=2",
                  *overrides)
        mem[stage] = r["peak_rss_mib"]
        print(f"ZeRO-{stage}, 2 workers: peak RSS per worker {r['peak_rss_mib']} MiB ({r['tokens_per_s']:.1f} tokens/s)")

    s, best_leg, seed_leg = results["sft_ray"], results["trl_best"], results["trl_seed"]
    out = {
        "ratio_vs_trl_seed": round(s["tokens_per_s"] / seed_leg["tokens_per_s"], 3),
        "ratio_vs_trl_best": round(s["tokens_per_s"] / best_leg["tokens_per_s"], 3),
        "wall_ratio_vs_trl_best": round(best_leg["wall_s"] / s["wall_s"], 3),
        "trl_best_layout": best,
        "tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in results.items()},
        "wall_s": {k: v["wall_s"] for k, v in results.items()},
        "last_loss": {k: round(v["last_loss"], 4) for k, v in results.items()},
        "peak_rss_mib_per_worker_by_zero_stage": mem,
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "trl":  # saves the model as a user's script would (then drops it: only figures are kept)
            saved = tempfile.mkdtemp(prefix="bench-trl-model-")
            res = trl_leg(rest[1], json.loads(rest[0]), save_to=saved)
            shutil.rmtree(saved, ignore_errors=True)
        else:
            res = sft_ray_leg(rest[0], rest[1:])
        sys.stdout.write("\n" + json.dumps(res) + "\n")
    else:
        main(sys.argv[1:])
