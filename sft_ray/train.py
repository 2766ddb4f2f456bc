"""Ray Train driver and the per-worker loop.

Driver: data (read, tokenize, validate, count) -> ``TorchTrainer`` -> the exported model on disk.
Worker: SFTTrainer (DeepSpeed ZeRO) fed batches from its Ray Data shard; checkpoints and metrics go to
Ray Train; at the end all ranks join the export (ZeRO-3 gathers) and rank 0 reports the final model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_ray.config import Config

log = logging.getLogger(__name__)

FINAL_MARKER = "sft_ray_final.json"


def say(msg: str) -> None:
    """Progress line to the job log. Not print(): Ray Train patches print into a logger and tees it."""
    sys.__stdout__.write(f"[sft-ray] {msg}\n")
    sys.__stdout__.flush()
FINAL_DIR = "final_model"
PROBE_FILE = "sft_ray_probe.pt"
PROBE_TEXT = "sft-ray export check: the quick brown fox jumps over the lazy dog."


@dataclass
class Plan:
    """What the driver decided from the data, handed to every worker."""

    max_steps: int
    steps_per_epoch: int
    rows: int
    rows_per_worker: int
    passes: int
    has_eval: bool
    bins_per_row: float | None = None  # packing: expected bins per row (sets the steps of an epoch)


# ----------------------------------------------------------------------------- worker side


def _batches(shard, batch_size: int, pad_id: int, passes: int, shuffle_buffer: int, seed: int, counter: dict,
             pack: dict | None = None):
    """Iterable of torch batches over ``passes`` epochs of a Ray Data shard (one long stream, so gradient
    accumulation never straddles an epoch boundary awkwardly).

    ``pack`` ({capacity, window, flat}): rows are packed, window by window, into bins of ``capacity`` tokens
    and ``batch_size`` bins make a batch; the stream then repeats its shard until the Trainer stops at
    max_steps, because the number of bins is known only approximately in advance."""
    import itertools
    from functools import partial

    import torch

    from sft_ray.data import pad_collate
    from sft_ray.packing import pack_stream, packed_collate
    from sft_ray.template import IGNORE_INDEX

    def epoch_batches(epoch: int):
        """(batch, real tokens) pairs of one pass over the shard."""
        shuffle = {"local_shuffle_buffer_size": shuffle_buffer or None,
                   "local_shuffle_seed": (seed + epoch) if shuffle_buffer else None}
        if pack is None:
            for b in shard.iter_torch_batches(batch_size=batch_size, collate_fn=partial(pad_collate, pad_id=pad_id),
                                              prefetch_batches=2, **shuffle):
                yield b, int(b["attention_mask"].sum())
            return
        windows = shard.iter_batches(batch_size=pack["window"], batch_format="numpy", prefetch_batches=1, **shuffle)
        for bins in pack_stream(windows, pack["capacity"], batch_size):
            yield packed_collate(bins, pad_id, flat=pack["flat"]), sum(len(s["input_ids"]) for b in bins for s in b)

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for epoch in (itertools.count() if pack else range(passes)):
                for batch, real in epoch_batches(epoch):
                    counter["tokens"] += real
                    counter["trained"] += int((batch["labels"] != IGNORE_INDEX).sum())
                    yield batch

    return _Stream()


def lora_export(adapter_dir: Path, cfg: Config, tok) -> Path:
    """A LoRA run exports its adapter (pointing at the base model); with ``export.merge_lora`` the folder is
    the merged full model instead, with the adapter kept in ``adapter/``."""
    from sft_ray.modeling import load_merged, resolve_model_path

    base = resolve_model_path(cfg.model.name)
    acfg = adapter_dir / "adapter_config.json"
    a = json.loads(acfg.read_text())
    a["base_model_name_or_path"] = base  # where this run's base weights are, so the folder serves as is
    acfg.write_text(json.dumps(a, indent=2))
    if not cfg.export.merge_lora:
        return adapter_dir
    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # training is over: without this, from_pretrained would see ZeRO-3 still configured and start a
    # collective partitioned load on this one rank (a deadlock)
    unset_hf_deepspeed_config()
    merged_dir = adapter_dir.with_name(adapter_dir.name + "-merged")
    merged = load_merged(base, str(adapter_dir), tok, torch.float32, cfg.model.trust_remote_code)
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    shutil.move(str(adapter_dir), str(merged_dir / "adapter"))
    return merged_dir


def check_checkpoint(path: Path, world: int, sharded: bool) -> int:
    """The step of a complete training checkpoint; a clear error for one that is not.

    Ray Train registers a checkpoint only after every rank's upload has finished, so an interrupted upload
    is never handed back; this is the second line of defence (e.g. a hand-copied folder)."""
    state = path / "trainer_state.json"
    if not state.is_file():
        raise RuntimeError(f"checkpoint {path} is incomplete: no trainer_state.json")
    step = int(json.loads(state.read_text())["global_step"])
    if sharded:
        shards = list(path.rglob("*optim_states.pt"))
        if len(shards) != world:
            raise RuntimeError(f"checkpoint {path} is incomplete: {len(shards)} optimizer shards for {world} workers "
                               "(resume with the same train.num_workers it was written with)")
    return step


def _make_trainer_class():
    import torch
    from trl import SFTTrainer

    class RayDataSFTTrainer(SFTTrainer):
        """SFTTrainer that reads pre-tokenized batches from Ray Data shards.

        The DataLoaders are not passed through accelerate: each Ray worker already holds its own shard.
        """

        def __init__(self, *args, ray_train, ray_eval, trace=None, fused_lm_head=True, **kwargs):
            self._ray_train, self._ray_eval, self._trace = ray_train, ray_eval, trace
            self._fused_lm_head = fused_lm_head
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """TRL's fused (chunked fp32) LM-head loss saves the memory of the full logits, which matters on GPUs
            with big vocabularies; on CPUs the model's own loss ran ~1.5x faster (docs/benchmarks.md)."""
            if self._fused_lm_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from transformers import Trainer

            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self._ray_train, batch_size=None)

        def get_eval_dataloader(self, eval_dataset=None):
            return torch.utils.data.DataLoader(self._ray_eval, batch_size=None)

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs.pop("example_id", None)
            if ids is not None and self._trace is not None:
                self._trace(self.state.global_step + 1, ids)
            return super().training_step(model, inputs, *args, **kwargs)

    return RayDataSFTTrainer


class ExampleTrace:
    """Appends which examples each optimizer step trained on (``train.trace_examples``); one line per
    micro-batch, tagged with this worker process's attempt, so a resumed run can be checked against an
    uninterrupted one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.attempt = path, f"{os.getpid()}-{time.time_ns()}"

    def __call__(self, step: int, ids: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "t": time.time(), "step": step, "ids": list(ids)}) + "\n")


def _callbacks(rank: int, world: int, plan: Plan, counter: dict):
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        """Progress lines on rank 0, and every Trainer checkpoint reported to Ray Train (all ranks)."""

        def __init__(self):
            self.t0 = time.time()
            self.latest: dict[str, Any] = {}
            self.history: list[dict[str, Any]] = []

        def _global_tokens(self) -> tuple[int, int]:
            t = torch.tensor([counter["tokens"], counter["trained"]], dtype=torch.long)
            if dist.is_available() and dist.is_initialized() and world > 1:
                dist.all_reduce(t)
            return int(t[0]), int(t[1])

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.t_last = time.time()
            self.tok0 = self.tok_last = self._global_tokens()[0]

        def on_log(self, args, state, control, logs=None, **kw):
            tokens, trained = self._global_tokens()
            now = time.time()
            logs = dict(logs or {})
            if "loss" in logs:  # training-step logs: throughput over the window since the last one
                logs["tokens_per_s"] = round((tokens - self.tok_last) / max(now - self.t_last, 1e-9), 2)
                self.t_last, self.tok_last = now, tokens
            if plan.steps_per_epoch:  # Trainer cannot know epochs of a stream; the plan does
                logs["epoch"] = round(state.global_step / plan.steps_per_epoch, 3)
            logs.update(step=state.global_step, tokens=tokens, trained_tokens=trained,
                        avg_tokens_per_s=round((tokens - self.tok0) / max(now - self.t0, 1e-9), 2))
            self.latest.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            self.history.append(logs)
            if rank == 0:
                shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                                 if k in ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch"))
                say(f"step {state.global_step}/{plan.max_steps} {shown}")

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir, f"checkpoint-{state.global_step}")
            metrics = {**self.latest, "step": state.global_step}
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)),
                checkpoint_dir_name=f"checkpoint-{state.global_step:07d}",
            )
            # the local copy is uploaded; keep disk use flat on long runs
            shutil.rmtree(ckpt, ignore_errors=True)

    return RayReport()


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import ray.train
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Ray Train's worker root logger is at INFO; dill (via datasets fingerprinting) would dump bytecode there
    noisy = ["dill", "datasets", "deepspeed", "torch.distributed", "ray.train"]
    try:  # Ray Train logs every report at INFO, under the module's *file path* as the logger name
        from ray.train.v2._internal.execution import context as _ray_train_context

        noisy.append(_ray_train_context.__file__)
    except ImportError:
        pass
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)

    from sft_ray import deepspeed as ds_builder
    from sft_ray.modeling import choose_precision, load_model, load_tokenizer

    cfg = Config.model_validate(loop_cfg["cfg"])
    plan = Plan(**loop_cfg["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    precision = choose_precision(cfg.train.precision)
    fused = on_gpu if cfg.train.fused_lm_head == "auto" else cfg.train.fused_lm_head
    if rank == 0:
        say(f"worker: {'cuda' if on_gpu else 'cpu'}, precision {precision}, {world} workers, "
            f"torch threads {torch.get_num_threads()}, ZeRO {cfg.deepspeed.zero_stage if cfg.deepspeed.enabled else 'off'}, "
            f"loss {'fused LM head (TRL)' if fused else 'model'}")

    if cfg.deepspeed.enabled:
        import deepspeed

        # Ray Train already set up torch.distributed; DeepSpeed's comm layer must adopt it *now*, or
        # zero.Init inside from_pretrained (ZeRO-3) sees a world of 1 and rejects the batch config.
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

    local = Path(tempfile.mkdtemp(prefix=f"sft-ray-{cfg.train.name}-rank{rank}-"))
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory(str(local / "resume")))
        if (resume_dir / FINAL_MARKER).is_file():  # the run had finished: hand back the same model
            ray.train.report(json.loads((resume_dir / FINAL_MARKER).read_text()),
                             checkpoint=ray.train.Checkpoint.from_directory(str(resume_dir)) if rank == 0 else None,
                             checkpoint_dir_name=FINAL_DIR)
            return
        step = check_checkpoint(resume_dir, world, cfg.deepspeed.enabled and cfg.deepspeed.zero_stage > 0)
        if rank == 0:
            say(f"resuming from checkpoint at step {step} ({checkpoint.path})")

    tok = load_tokenizer(cfg.model)
    t = cfg.train
    eval_steps = t.eval_steps if plan.has_eval and t.eval_steps else None
    report_to = t.report_to or (["tensorboard"] if importlib.util.find_spec("tensorboard") else ["none"])
    if "tensorboard" in report_to:  # rank 0 writes; on one node this is the run's own folder
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(loop_cfg["output_dir"], "tensorboard"))
    # The SFTConfig (with its DeepSpeed dict) must exist before from_pretrained: under ZeRO-3 that is
    # what makes transformers partition the weights at load time instead of loading them whole per rank.
    args = SFTConfig(
        output_dir=str(local / "trainer"),
        max_steps=plan.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        use_liger_kernel=t.liger_kernel,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        prediction_loss_only=True,
        report_to=report_to,
        deepspeed=ds_builder.build(cfg.deepspeed, on_gpu, precision),
        use_cpu=not on_gpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        max_length=None,
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        save_only_model=False,
    )
    model = load_model(cfg.model, tok, precision, cfg.lora.quantize_4bit)
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")

    counter = {"tokens": 0, "trained": 0}
    # SFTTrainer peeks at one row of train_dataset for its checks; the real data comes from the Ray shard
    import datasets
    from datasets import Dataset

    datasets.disable_caching()  # no fingerprint hashing (dill dumps bytecode into the worker log)
    sample = Dataset.from_dict({"input_ids": [[tok.eos_token_id] * 2], "labels": [[tok.eos_token_id] * 2]})
    pack = None
    if cfg.data.packing:  # flash-attention's varlen kernels take one padding-free row; sdpa/eager a row per bin
        pack = {"capacity": cfg.data.max_length, "window": cfg.data.pack_window,
                "flat": "flash" in (cfg.model.attn_implementation or "")}
    train_stream = _batches(ray.train.get_dataset_shard("train"), t.per_device_batch_size, tok.pad_token_id,
                            plan.passes, cfg.data.shuffle_buffer, cfg.seed, counter, pack)
    eval_stream = (_batches(ray.train.get_dataset_shard("eval"), t.per_device_batch_size, tok.pad_token_id, 1, 0,
                            cfg.seed, {"tokens": 0, "trained": 0}) if plan.has_eval else None)
    report = _callbacks(rank, world, plan, counter)
    trainer = _make_trainer_class()(
        model=model, args=args, processing_class=tok, train_dataset=sample, peft_config=peft_config,
        eval_dataset=sample if eval_stream is not None else None, callbacks=[report],
        ray_train=train_stream, ray_eval=eval_stream,
        trace=ExampleTrace(Path(loop_cfg["output_dir"], "trace", f"rank{rank}.jsonl")) if t.trace_examples else None,
        fused_lm_head=fused,
    )
    trainer.remove_callback(__import__("transformers").PrinterCallback)
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    final_metrics: dict[str, Any] = {**report.latest, "step": trainer.state.global_step}
    evaluated_last_step = bool(eval_steps) and trainer.state.global_step % eval_steps == 0 \
        and "eval_loss" in report.latest
    if eval_stream is not None and not evaluated_last_step:  # (the last step's eval is the final one)
        final_metrics.update(trainer.evaluate())

    final_metrics.update(_peak_memory(world))

    # Logits of the trained model on a fixed probe, kept beside the export so anyone can check that the
    # exported folder reproduces the trained model (a ZeRO-3 export with missing gathers would not).
    probe_ids = torch.tensor([tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]], device=args.device)
    trainer.model_wrapped.eval()
    with torch.no_grad():  # all ranks: under ZeRO-3 the forward gathers each layer's shards
        probe_logits = trainer.model_wrapped(input_ids=probe_ids).logits.float().cpu()

    # Export: every rank joins (the ZeRO-3 16-bit gather is collective); rank 0 writes the folder.
    export = local / "export"
    trainer.save_model(str(export))
    if rank == 0 and cfg.lora.enabled:
        export = lora_export(export, cfg, tok)
    if rank == 0:
        torch.save({"input_ids": probe_ids.cpu(), "logits": probe_logits}, export / PROBE_FILE)
        tok.save_pretrained(str(export))
        gen = GenerationConfig.from_model_config(trainer.model.config) if trainer.model.generation_config is None \
            else trainer.model.generation_config
        gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
        gen.save_pretrained(str(export))
        (export / "train_history.json").write_text(json.dumps(report.history, indent=1))
        (export / FINAL_MARKER).write_text(json.dumps(final_metrics))
    ray.train.report(final_metrics,
                     checkpoint=ray.train.Checkpoint.from_directory(str(export)) if rank == 0 else None,
                     checkpoint_dir_name=FINAL_DIR)
    shutil.rmtree(local, ignore_errors=True)


def _peak_memory(world: int) -> dict[str, list[float]]:
    """Peak memory of every worker (MiB): process RSS, and CUDA allocations on GPU; all ranks take part."""
    import resource

    import torch
    import torch.distributed as dist

    mine = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "cuda": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}
    every = [mine]
    if world > 1 and dist.is_available() and dist.is_initialized():
        every = [None] * world
        dist.all_gather_object(every, mine)
    out = {"peak_rss_mib_per_worker": [round(m["rss"], 1) for m in every]}
    if torch.cuda.is_available():
        out["peak_cuda_mib_per_worker"] = [round(m["cuda"], 1) for m in every]
    return out


# ----------------------------------------------------------------------------- driver side


def _sigterm_as_interrupt() -> None:
    """SIGTERM (``ray job stop``, a scheduler) stops a driver like Ctrl-C does: Python unwinds, Ray shuts
    down its workers, checkpoints stay. Installed after ``ray.init``, whose own handler aborts the process."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def init_ray(cfg: Config) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), the configured one, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    try:
        _init_ray(cfg)
    finally:
        _sigterm_as_interrupt()


def _init_ray(cfg: Config) -> None:
    import ray

    env_vars = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
    if "SFT_RAY_CACHE" in os.environ:
        env_vars["SFT_RAY_CACHE"] = os.environ["SFT_RAY_CACHE"]
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    # one logical CPU beyond the trainers so Ray Data's tokenizers can stream while they train
    # the dashboard (127.0.0.1 only) serves the state API that Ray Train's placement-group cleaner polls
    ray.init(num_cpus=max(os.cpu_count() or 1, need + 1), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env_vars}, log_to_driver=True, logging_level=logging.WARNING)


def resolve_data(cfg: Config) -> tuple[list[str], list[str]]:
    """Data specs for train and eval; 'generated' writes the built-in task under output_dir/data."""
    from sft_ray import synthetic

    train, evals = list(cfg.data.train), list(cfg.data.eval)
    if "generated" in train or "generated" in evals:
        tr, ev = synthetic.write_task(Path(cfg.output_dir, "data"), cfg.data.generated_train_rows,
                                      cfg.data.generated_eval_rows, cfg.seed)
        train = [str(tr) if s == "generated" else s for s in train]
        evals = [str(ev) if s == "generated" else s for s in evals]
    return train, evals


def check_storage_shared(storage: str) -> None:
    """On a multi-node cluster every node must see ``storage_path`` (each rank uploads its own shards there,
    and a restarted worker group may land on other nodes). URIs (s3://, gs://, ...) are shared by nature;
    a local path is checked: a marker written here must be visible from a task on every node."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sft_ray.config import ConfigError

    if "://" in storage:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    Path(storage).mkdir(parents=True, exist_ok=True)
    marker = Path(storage, f".sft-ray-shared-{uuid.uuid4().hex}")
    marker.write_text("ok\n")
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, ray.get(refs, timeout=120)) if not ok]
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise ConfigError(
            f"train.storage_path={storage} is not shared: node(s) {', '.join(missing)} cannot see it. On more "
            "than one node, checkpoints must go where every node reads and writes the same files: object "
            "storage (train.storage_path=s3://bucket/runs or gs://...) or an NFS mount at the same path everywhere"
        )


def plan_run(cfg: Config, train_stats, has_eval: bool) -> Plan:
    from sft_ray.data import DataError, lengths_from_hist, steps_per_epoch
    from sft_ray.packing import expected_bins

    t = cfg.train
    bins_per_row = None
    if cfg.data.packing:
        bins_per_row = expected_bins(lengths_from_hist(train_stats.length_hist, cfg.data.max_length),
                                     cfg.data.max_length, cfg.data.pack_window, seed=cfg.seed)
    spe, per_worker = steps_per_epoch(train_stats.rows, t.num_workers, t.per_device_batch_size, t.grad_accum,
                                      bins_per_row)
    if spe == 0 and t.max_steps is None:
        unit = "packed bins" if bins_per_row is not None else "rows"
        raise DataError(
            f"{train_stats.rows} training rows are too few for {t.num_workers} workers x batch "
            f"{t.per_device_batch_size} {unit} x grad_accum {t.grad_accum}: not one optimizer step per epoch"
        )
    max_steps = t.max_steps or max(1, math.floor(t.num_epochs * spe))
    passes = math.ceil(max_steps / spe) if spe else max_steps  # enough passes over the data for max_steps
    return Plan(max_steps=max_steps, steps_per_epoch=spe, rows=train_stats.rows, rows_per_worker=per_worker,
                passes=passes, has_eval=has_eval, bins_per_row=bins_per_row)


def check_gpu_only_options(cfg: Config, use_gpu: bool) -> None:
    """Options whose kernels exist only for CUDA: refused up front on a CPU cluster, with what to do instead."""
    from sft_ray.config import ConfigError

    if use_gpu:
        return
    if cfg.lora.quantize_4bit:
        raise ConfigError("lora.quantize_4bit (QLoRA) needs CUDA GPUs: bitsandbytes' 4-bit kernels do not run on "
                          "this cluster's CPUs. Use lora.quantize_4bit=false (LoRA on full-precision weights).")
    if cfg.train.liger_kernel:
        raise ConfigError("train.liger_kernel needs CUDA GPUs (Liger's kernels are Triton); this cluster has none. "
                          "Use train.liger_kernel=false.")


def _clear_run(storage: str, name: str) -> None:
    import pyarrow.fs as pafs

    if "://" in storage:
        fs, root = pafs.FileSystem.from_uri(storage)
    else:
        fs, root = pafs.LocalFileSystem(), storage
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def run(cfg: Config) -> dict[str, Any]:
    """Train and export; returns a summary (paths, counts, timings, metrics)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from sft_ray import data

    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_specs, eval_specs = resolve_data(cfg)
    init_ray(cfg)

    train_tok, eval_tok = data.splits(train_specs, eval_specs, cfg)

    stats: dict[str, Any] = {}
    if cfg.data.validate_first:
        for name, ds in (("train", train_tok), ("eval", eval_tok)):
            if ds is None:
                continue
            st = data.validate(ds, name)
            say(f"{name} data: {st.summary()}")
            data.check(st, name, cfg.data.on_bad_rows)
            if st.bad:
                rejects = out / f"rejects-{name}"
                data.write_rejects(ds, rejects)
                say(f"skipped {st.bad} bad {name} row(s); reasons in {rejects}/")
            stats[name] = st
        plan = plan_run(cfg, stats["train"], eval_tok is not None)
    else:
        if cfg.train.max_steps is None:
            raise data.DataError("data.validate_first=false needs train.max_steps (a stream has no length)")
        plan = Plan(cfg.train.max_steps, 0, 0, 0, 10**6, eval_tok is not None)
    say(f"plan: {plan.max_steps} optimizer steps ({plan.steps_per_epoch}/epoch), {cfg.train.num_workers} workers "
        f"x batch {cfg.train.per_device_batch_size} x accum {cfg.train.grad_accum}")

    check_storage_shared(cfg.storage_path)
    if not cfg.train.resume:
        _clear_run(cfg.storage_path, cfg.train.name)
    use_gpu = cfg.train.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    check_gpu_only_options(cfg, bool(use_gpu))
    datasets = {"train": data.trainable(train_tok, cfg.data.on_bad_rows, cfg.data.tokenize_cpus,
                                        with_ids=cfg.train.trace_examples)}
    if eval_tok is not None:  # small by nature: materialized once (in the object store), not re-tokenized per eval
        datasets["eval"] = data.trainable(eval_tok, cfg.data.on_bad_rows, cfg.data.tokenize_cpus).materialize()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan.__dict__,
                           "output_dir": str(out.resolve())},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=bool(use_gpu),
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints + 1),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
        dataset_config=_ingest_config(),
    )
    t_train = time.time()
    result = trainer.fit()
    train_s = time.time() - t_train
    if result.error:
        raise result.error
    model_dir = export_final(result.checkpoint, out / "model")
    final = json.loads((model_dir / FINAL_MARKER).read_text())
    summary = {
        "model_dir": str(model_dir),
        "checkpoint": result.checkpoint.path,
        "plan": plan.__dict__,
        "data": {k: v.to_dict() for k, v in stats.items()},
        "metrics": final,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _ingest_config():
    """Deterministic shards: with order preserved, Ray Data's split hands each worker the same rows in the
    same order on every attempt (it then ignores locality), so a resumed run skips exactly the batches the
    checkpoint had consumed and trains on the rest, as an uninterrupted run would."""
    import warnings

    import ray.train

    with warnings.catch_warnings():  # Ray's own defaults use a field it has deprecated
        warnings.simplefilter("ignore")
        opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(execution_options=opts)


def export_final(checkpoint, dest: Path) -> Path:
    """Copy the final model out of Ray storage; swap it in only once complete."""
    dest = dest.resolve()
    tmp = dest.with_name(f".{dest.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    if not (tmp / FINAL_MARKER).is_file():
        raise RuntimeError(f"the last checkpoint ({checkpoint.path}) is not a finished model")
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
