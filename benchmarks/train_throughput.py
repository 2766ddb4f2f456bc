"""Training throughput: plain TRL (the seed lesson's recipe, and tuned) against sft-ray, side by side.

    .venv/bin/python benchmarks/train_throughput.py [rows=256] [zero_rows=32] [sft_ray_overrides='a=1 b=2']

Same model (the embedded SmolLM2-135M-Instruct), same generated rows, one epoch each (the same token
budget). Each run is a fresh process so that its peak memory is its own. Throughput is non-pad tokens per
second of the training loop (first step to last: model loading and export are outside it on both sides);
the wall time of the whole run is printed beside it. Then sft-ray alone with 2 workers at ZeRO-0, 2 and 3
for peak memory per worker. The last line is JSON with the ratios.

Other plain-TRL layouts (the survey in docs/benchmarks.md) can be run as extra TRL legs by name:
TRL_VARIANTS='{"bf16_bs2x4": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}}' and
``--child trl bf16_bs2x4 DATA.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# TRL runs: name -> SFTConfig fields on top of TRL's defaults (use_cpu because there is no GPU here)
TRL_RUNS = {
    # the seed lesson: lr 8e-5, batch 1 x accumulation 8, no gradient checkpointing; TRL's bf16 default stays
    "trl_seed": {"learning_rate": 8e-5, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
                 "gradient_checkpointing": False},
    # the best plain-TRL layout found on this machine (docs/benchmarks.md lists the others tried): bf16 autocast
    # (this CPU has AVX512-BF16), no checkpointing, batch 8 in one step. fp32 and TRL's own packing were slower.
    "trl_best": {"learning_rate": 8e-5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                 "gradient_checkpointing": False},
}
TRL_RUNS.update(json.loads(os.environ.get("TRL_VARIANTS", "{}")))  # extra layouts to try (docs/benchmarks.md)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_trl(name: str, data: str) -> dict:
    """One plain-TRL run in this process: SFTTrainer on the JSONL messages, as a user would write it."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft_ray.modeling import embedded_model_dir

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = load_dataset("json", data_files=data, split="train")
    out = tempfile.mkdtemp(prefix="bench-trl-")
    args = SFTConfig(output_dir=out, use_cpu=True, num_train_epochs=1, save_strategy="no", report_to="none",
                     logging_steps=1, disable_tqdm=True, max_length=256, seed=42, **TRL_RUNS[name])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counted["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
            int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.time()

        def on_train_end(self, *a, **k):
            self.t1 = time.time()

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "train_s": clock.t1 - clock.t0, "steps": trainer.state.global_step,
            "peak_rss_mib": [round(_peak_rss_mib(), 1)], "first_loss": losses[0], "last_loss": losses[-1]}


def child_sft_ray(data: str, overrides: list[str]) -> dict:
    """sft-ray's default job config (jobs/configs/local-cpu.yaml) on the same rows, on local Ray."""
    from sft_ray.config import load_config
    from sft_ray.train import run

    out = tempfile.mkdtemp(prefix="bench-sft-ray-")

    cfg = load_config(ROOT / "jobs/configs/local-cpu.yaml", [
        f"data.train={data}", "data.eval=[]", "eval.enabled=false", "train.num_epochs=1", "train.save_steps=100000",
        "train.eval_steps=null", f"output_dir={out}", "train.name=bench", "train.resume=false", *overrides])
    try:
        m = run(cfg)["metrics"]
    finally:  # checkpoints and the export are GBs; only the figures are kept
        shutil.rmtree(out, ignore_errors=True)
    return {"tokens": m["tokens"], "train_s": m["tokens"] / m["avg_tokens_per_s"], "steps": m["step"],
            "peak_rss_mib": m["peak_rss_mib_per_worker"], "first_loss": None, "last_loss": m.get("loss"),
            "config": {k: v for k, v in cfg.train.model_dump().items()
                       if k in ("num_workers", "cpus_per_worker", "per_device_batch_size", "grad_accum", "precision")}
            | {"zero_stage": cfg.deepspeed.zero_stage, "packing": cfg.data.packing}}


def spawn(kind: str, *args: str) -> dict:
    """Run one benchmark leg in a fresh process; its last stdout line is the result."""
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", kind, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"{kind} failed (exit {p.returncode})")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t0
    res["tokens_per_s"] = res["tokens"] / res["train_s"]
    return res


def main(argv: list[str]) -> None:
    opts = {"rows": "256", "zero_rows": "32", "sft_ray_overrides": ""}
    for a in argv:
        k, _, v = a.partition("=")
        if k not in opts:
            raise SystemExit(f"unknown option {k!r}; options: {', '.join(opts)}")
        opts[k] = v
    from sft_ray.modeling import embedded_model_dir
    from sft_ray.synthetic import write_task

    embedded_model_dir()  # built once, outside every timed leg
    data_dir = Path(tempfile.mkdtemp(prefix="bench-train-data-"))  # small; removed at the end
    train, _ = write_task(data_dir, int(opts["rows"]), 1, seed=42)
    overrides = opts["sft_ray_overrides"].split()

    results = {}
    for name in TRL_RUNS:
        results[name] = spawn("trl", name, str(train))
    results["sft_ray"] = spawn("sft_ray", str(train), *overrides)
    print(f"\n{int(opts['rows'])} generated rows, one epoch each, embedded SmolLM2-135M-Instruct, "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':10} {'tokens':>7} {'steps':>5} {'tokens/s':>9} {'train s':>8} {'wall s':>7} "
          f"{'peak RSS MiB per process':>26}  loss first -> last")
    for name, r in results.items():
        first = f"{r['first_loss']:.3f}" if r["first_loss"] is not None else "  -  "
        print(f"{name:10} {r['tokens']:7d} {r['steps']:5d} {r['tokens_per_s']:9.1f} {r['train_s']:8.1f} "
              f"{r['wall_s']:7.1f} {str(r['peak_rss_mib']):>26}  {first} -> {r['last_loss']:.3f}")
    print(f"sft-ray config: {results['sft_ray']['config']}")

    mem = {}
    zero_train, _ = write_task(data_dir / "zero", int(opts["zero_rows"]), 1, seed=7)
    for stage in (0, 2, 3):
        r = spawn("sft_ray", str(zero_train), f"deepspeed.zero_stage={stage}", "train.num_workers=2", *overrides)
        mem[stage] = r["peak_rss_mib"]
        print(f"ZeRO-{stage}, 2 workers: peak RSS per worker {r['peak_rss_mib']} MiB ({r['tokens_per_s']:.1f} tokens/s)")

    out = {
        "ratio_vs_trl_seed": round(results["sft_ray"]["tokens_per_s"] / results["trl_seed"]["tokens_per_s"], 3),
        "ratio_vs_trl_best": round(results["sft_ray"]["tokens_per_s"] / results["trl_best"]["tokens_per_s"], 3),
        "tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in results.items()},
        "peak_rss_mib_per_worker_by_zero_stage": mem,
    }
    shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        res = child_trl(rest[0], rest[1]) if kind == "trl" else child_sft_ray(rest[0], rest[1:])
        sys.stdout.write("\n" + json.dumps(res) + "\n")
    else:
        main(sys.argv[1:])
