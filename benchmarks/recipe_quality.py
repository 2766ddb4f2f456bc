"""Held-out quality of sft-ray's default recipe against plain TRL, task by task, measured side by side.

    .venv/bin/python benchmarks/recipe_quality.py [tasks=reverse,extract,shopping,lookup] [rows=...]
                                                  [eval_rows=64] [sft_ray_overrides='a=1 b=2']

For each generated task (``sft_ray.synthetic``: rows of ~45 to ~410 tokens, answers checked exactly, one
multi-turn task) both sides train the embedded SmolLM2-135M-Instruct on the same rows for the same epochs:
- ``sft_ray``: ``jobs/configs/local-cpu.yaml`` as shipped;
- ``trl``: plain TRL with the seed lessons' recipe: the chat rows with TRL's defaults (loss on every token),
  lr 8e-5, batch 1 x gradient accumulation 8, no gradient checkpointing, in the fastest precision for this
  machine (bf16 where the CPU has bf16 instructions, else fp32; benchmarks/train_throughput.py measures it).
Both exported models are then scored by the project's own evaluation on the same held-out rows (exact
match of greedy answers, bootstrap 95% intervals). Wall time is each leg's whole process.
Last line: JSON with ``min_score_gap_vs_trl`` (the smallest sft-ray minus TRL score over the tasks),
``scores`` per task and side, and ``wall_ratio_vs_trl`` (TRL wall / sft-ray wall; ``min`` over tasks too).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, score_models, sft_ray_leg, spawn, trl_leg  # noqa: E402

ROWS = {"reverse": 400, "extract": 320, "shopping": 320, "lookup": 120}
MAX_NEW_TOKENS = {"reverse": 16, "extract": 40, "shopping": 32, "lookup": 8}


def seed_recipe() -> dict:
    from sft_ray.modeling import cpu_supports_bf16

    return {"learning_rate": 8e-5, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
            "gradient_checkpointing": False, "bf16": cpu_supports_bf16()}


def main(argv: list[str]) -> None:
    opts = {"tasks": ",".join(ROWS), "rows": "", "eval_rows": "64", "sft_ray_overrides": "", "legs": "sft_ray,trl"}
    for a in argv:
        k, _, v = a.partition("=")
        if k not in opts:
            raise SystemExit(f"unknown option {k!r}; options: {', '.join(opts)}")
        opts[k] = v
    from sft_ray.config import load_config
    from sft_ray.modeling import embedded_model_dir
    from sft_ray.synthetic import write_task

    embedded_model_dir()
    overrides = opts["sft_ray_overrides"].split()
    epochs = load_config(ROOT / "jobs/configs/local-cpu.yaml", overrides).train.num_epochs
    tasks = opts["tasks"].split(",")
    rows = dict(ROWS)
    if opts["rows"]:
        rows.update({t: int(opts["rows"]) for t in tasks})
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    table, scores, walls = [], {}, {}
    for task in tasks:
        train, evals = write_task(work / task, rows[task], int(opts["eval_rows"]), seed=42, task=task)
        legs = opts["legs"].split(",")
        models = {k: str(work / task / k) for k in legs}
        none = {"wall_s": float("nan"), "train_s": float("nan"), "steps": 0}
        s = spawn(__file__, "sft_ray", str(train), models["sft_ray"], *overrides) if "sft_ray" in legs else none
        t = spawn(__file__, "trl", str(train), models["trl"], json.dumps(seed_recipe()), str(epochs)) \
            if "trl" in legs else none
        sc = spawn(__file__, "score", json.dumps(models), str(evals), str(MAX_NEW_TOKENS[task]), opts["eval_rows"])
        nan = {"exact_match": float("nan"), "ci95": [float("nan")] * 2, "examples": [["", ""]]}
        sc = {"sft_ray": nan, "trl": nan, **sc}
        scores[task] = {k: {"exact_match": round(v["exact_match"], 4), "ci95": [round(x, 4) for x in v["ci95"]]}
                        for k, v in sc.items() if k in models}
        walls[task] = {"sft_ray": s["wall_s"], "trl": t["wall_s"]}
        table.append((task, rows[task], s["steps"], t["steps"], sc["sft_ray"], sc["trl"], s["wall_s"], t["wall_s"]))
        print(f"{task}: sft-ray {sc['sft_ray']['exact_match']:.3f} {sc['sft_ray']['ci95']} in {s['wall_s']:.0f}s "
              f"(loop {s['train_s']:.0f}s, {s['steps']} steps) | trl {sc['trl']['exact_match']:.3f} "
              f"{sc['trl']['ci95']} in {t['wall_s']:.0f}s (loop {t['train_s']:.0f}s, {t['steps']} "
              f"steps); e.g. {sc['sft_ray']['examples'][0]}", flush=True)
        shutil.rmtree(work / task, ignore_errors=True)
    print(f"\nheld-out exact match, {opts['eval_rows']} rows per task, {epochs:g} epoch(s) each; sft-ray: "
          f"jobs/configs/local-cpu.yaml {' '.join(overrides)}; trl: seed recipe {seed_recipe()}")
    print(f"{'task':9} {'rows':>5} {'steps s/t':>9} {'sft-ray (95% CI)':>24} {'trl (95% CI)':>24} "
          f"{'wall s sft-ray':>14} {'wall s trl':>10} {'wall ratio':>10}")
    for task, n, ss, ts, a, b, wa, wb in table:
        print(f"{task:9} {n:5d} {ss:4d}/{ts:<4d} {a['exact_match']:8.3f} ({a['ci95'][0]:.2f}-{a['ci95'][1]:.2f})"
              f"       {b['exact_match']:8.3f} ({b['ci95'][0]:.2f}-{b['ci95'][1]:.2f})       {wa:14.0f} {wb:10.0f} "
              f"{wb / wa:10.2f}")
    gaps = {t: scores[t]["sft_ray"]["exact_match"] - scores[t]["trl"]["exact_match"] for t in scores
            if {"sft_ray", "trl"} <= set(scores[t])}
    ratios = {t: round(walls[t]["trl"] / walls[t]["sft_ray"], 3) for t in walls}
    total = sum(w["trl"] for w in walls.values()) / sum(w["sft_ray"] for w in walls.values())
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"min_score_gap_vs_trl": round(min(gaps.values()), 4) if gaps else None, "score_gap_vs_trl": gaps,
                      "scores": scores, "wall_ratio_vs_trl": {"total": round(total, 3), "min": min(ratios.values()),
                                                              "per_task": ratios}, "wall_s": walls}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "sft_ray":
            res = sft_ray_leg(rest[0], rest[2:], keep_model_to=rest[1])
        elif kind == "trl":
            res = trl_leg(rest[0], json.loads(rest[2]), save_to=rest[1], epochs=float(rest[3]))
        else:
            res = score_models(json.loads(rest[0]), rest[1], int(rest[2]), int(rest[3]))
        sys.stdout.write("\n" + json.dumps(res) + "\n")
    else:
        main(sys.argv[1:])
