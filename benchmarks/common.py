"""Legs shared by the benchmarks: plain TRL as a user would run it, sft-ray's job, and scoring.

Every leg runs in a fresh process (``spawn``), so its wall time is the whole process (imports, model load,
data preparation, Ray start for sft-ray, training, saving the model) and its peak memory is its own.
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


def spawn(script: str, *args: str, timeout: int = 7200) -> dict:
    """Run ``script --child ARGS`` in a fresh process; its last stdout line is the JSON result."""
    t0 = time.time()
    p = subprocess.run([sys.executable, script, "--child", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "RAY_ADDRESS": ""}, timeout=timeout)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"{args[0]} failed (exit {p.returncode})")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t0, 1)
    if res.get("train_s"):
        res["tokens_per_s"] = res["tokens"] / res["train_s"]
    return res


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pretokenize(train_file: str, out_file: str, max_length: int = 1024) -> str:
    """The rows as sft-ray trains on them (its template rendering and masks), as ``input_ids``/``labels``
    JSONL: handed to TRL, its loss then covers exactly the tokens sft-ray's does."""
    from transformers import AutoTokenizer

    from sft_ray.formats import to_example
    from sft_ray.modeling import embedded_model_dir, ensure_chat_template
    from sft_ray.template import tokenize_example

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    ensure_chat_template(tok)
    with open(train_file) as f, open(out_file, "w") as out:
        for line in f:
            t = tokenize_example(to_example(json.loads(line)), tok, max_length)
            out.write(json.dumps({"input_ids": t["input_ids"], "labels": t["labels"]}) + "\n")
    return out_file


def trl_leg(data: str, sft_args: dict, save_to: str | None = None, epochs: float = 1.0) -> dict:
    """Plain TRL ``SFTTrainer`` on a JSONL file (messages, or pre-tokenized input_ids/labels), as a user
    would write it; the non-pad tokens of every batch are counted, the loop timed, the model saved."""
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
    args = SFTConfig(output_dir=out, use_cpu=True, num_train_epochs=epochs, save_strategy="no", report_to="none",
                     logging_steps=1, disable_tqdm=True, seed=42, **({"max_length": 1024} | sft_args))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        if "attention_mask" in batch:
            counted["tokens"] += int(batch["attention_mask"].sum())
        elif "position_ids" in batch:  # padding-free: one flat line of real tokens
            counted["tokens"] += int(batch["input_ids"].numel())
        else:
            counted["tokens"] += int(batch["input_ids"].numel())
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
    if save_to:
        trainer.save_model(save_to)
        tok.save_pretrained(save_to)
    shutil.rmtree(out, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "train_s": clock.t1 - clock.t0, "steps": trainer.state.global_step,
            "peak_rss_mib": [round(peak_rss_mib(), 1)], "first_loss": losses[0], "last_loss": losses[-1]}


def sft_ray_leg(train: str, overrides: list[str], keep_model_to: str | None = None) -> dict:
    """sft-ray's default job (jobs/configs/local-cpu.yaml) on the same rows, on local Ray; its own before/after
    evaluation off (the benchmark scores every leg the same way)."""
    from sft_ray.config import load_config
    from sft_ray.train import run

    out = tempfile.mkdtemp(prefix="bench-sft-ray-")
    cfg = load_config(ROOT / "jobs/configs/local-cpu.yaml", [
        f"data.train={train}", "data.eval=[]", "eval.enabled=false", "train.save_steps=100000",
        "train.eval_steps=null", f"output_dir={out}", "train.name=bench", "train.resume=false", *overrides])
    try:
        summary = run(cfg)
        if keep_model_to:
            shutil.copytree(summary["model_dir"], keep_model_to, dirs_exist_ok=True)
    finally:  # checkpoints and the export are GBs; only the figures are kept
        shutil.rmtree(out, ignore_errors=True)
    m = summary["metrics"]
    return {"tokens": m["tokens"], "train_s": m["tokens"] / m["avg_tokens_per_s"], "steps": m["step"],
            "peak_rss_mib": m["peak_rss_mib_per_worker"], "first_loss": None, "last_loss": m.get("loss"),
            "plan": summary["plan"],
            "config": {k: v for k, v in cfg.train.model_dump().items()
                       if k in ("num_workers", "per_device_batch_size", "grad_accum", "learning_rate", "lr_scheduler",
                                "warmup_ratio", "num_epochs", "precision")}
            | {"zero_stage": cfg.deepspeed.zero_stage, "packing": cfg.data.packing}}


def score_models(model_dirs: dict[str, str], eval_file: str, max_new_tokens: int, limit: int) -> dict:
    """Exact match of each model on the same held-out rows, with the project's own evaluation (the same
    prompts for every model, greedy decoding), and a bootstrap 95% interval."""
    from sft_ray import evaluate
    from sft_ray.cluster import init_ray
    from sft_ray.config import load_config
    from sft_ray.data import _tokenizer

    cfg = load_config(ROOT / "jobs/configs/local-cpu.yaml", ["eval.actors=1"])
    init_ray(cfg)
    pairs = evaluate.eval_pairs([eval_file], "auto", {}, limit)
    tok = _tokenizer(cfg.model)
    prompts = evaluate.render_prompts(tok, [p for p, _, _ in pairs], tools=[t for _, _, t in pairs])
    refs = [r for _, r, _ in pairs]
    out = {}
    for name, model_dir in model_dirs.items():
        answers = evaluate.generate(model_dir, prompts, tok, max_new_tokens, 16, 2)
        em = evaluate.score(answers, refs)["exact_match"]
        out[name] = {"exact_match": sum(em) / len(em), "ci95": evaluate.bootstrap_ci(em), "n": len(em),
                     "examples": [[refs[i], answers[i]] for i in range(3)]}
    return out
