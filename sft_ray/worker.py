"""The per-worker recipe that every Ray Train worker runs: set up, restore, build the trainer, train, export.

Each worker runs TRL's ``SFTTrainer`` (DeepSpeed ZeRO through the Trainer) on batches cut from its own
Ray Data shard: rows arrive tokenized and masked, TRL's dataset preparation is skipped, and the DataLoaders
read the shard directly instead of going through accelerate (each worker already holds its own shard).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

from transformers import TrainerCallback  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from sft_ray import collectives, export  # noqa: E402
from sft_ray.cluster import say  # noqa: E402
from sft_ray.config import Config  # noqa: E402
from sft_ray.packing import packed_collate  # noqa: E402
from sft_ray.plan import Plan, step_sizes  # noqa: E402
from sft_ray.template import IGNORE_INDEX  # noqa: E402

NOISY_LOGGERS = ["dill", "datasets", "deepspeed", "torch.distributed", "ray.train"]


# ----------------------------------------------------------------------------- the batch stream


@dataclass
class Layout:
    """How a micro-batch of rows becomes tensors."""

    pad_id: int
    packing: bool = False
    capacity: int = 1024  # packing: tokens per bin (data.max_length)
    flat: bool = False  # packing for flash-attention varlen kernels: one line, no padding

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:  # a micro-batch with nothing left to train: one pad token, no loss
            return {"input_ids": torch.tensor([[self.pad_id]]), "labels": torch.tensor([[IGNORE_INDEX]]),
                    "attention_mask": torch.tensor([[1]]), "num_tokens": 0}
        if self.packing:
            return packed_collate(rows, self.capacity, self.pad_id, flat=self.flat)
        from sft_ray.data import pad_collate

        cols = {k: [r[k] for r in rows] for k in rows[0]}
        out = pad_collate(cols, self.pad_id)
        out["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
        return out


def shard_rows(shard, epochs: int, shuffle_buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    """Rows of ``epochs`` passes over a worker's shard (0 = forever), each pass re-shuffled locally with its
    own seed (the shard itself already lies in the seeded global order)."""
    for epoch in (itertools.count() if epochs == 0 else range(epochs)):
        shuffle = {"local_shuffle_buffer_size": shuffle_buffer or None,
                   "local_shuffle_seed": (seed + epoch) if shuffle_buffer else None}
        for batch in shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2, **shuffle):
            keys = list(batch)
            for i in range(len(batch["input_ids"])):
                yield {k: batch[k][i] for k in keys}


class TrainStream(torch.utils.data.IterableDataset):
    """Exactly ``max_steps x grad_accum`` micro-batches: ``per_device_batch_size`` rows each, the plan's
    ``rows_to_train`` rows in all (the last step may be smaller, spread over its micro-batches)."""

    def __init__(self, shard, plan: Plan, batch: int, accum: int, layout: Layout, shuffle_buffer: int, seed: int):
        self.shard, self.plan, self.batch, self.accum, self.layout = shard, plan, batch, accum, layout
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def __iter__(self):
        rows = shard_rows(self.shard, self.plan.passes, self.shuffle_buffer, self.seed)
        left = self.plan.rows_to_train
        per_step = self.batch * self.accum
        for _ in range(self.plan.max_steps):
            n = min(per_step, left) if self.plan.rows_to_train else per_step
            for size in step_sizes(n, self.batch, self.accum):
                taken = list(itertools.islice(rows, size))
                if len(taken) < size:
                    raise RuntimeError(f"this worker's data ended early: {len(taken)} of {size} rows for a "
                                       f"micro-batch (the plan expected {self.plan.rows_to_train} rows per worker)")
                yield self.layout.collate(taken)
            left -= n


class EvalStream(torch.utils.data.IterableDataset):
    def __init__(self, shard, batch: int, pad_id: int):
        self.shard, self.batch, self.layout = shard, batch, Layout(pad_id)

    def __iter__(self):
        for b in self.shard.iter_batches(batch_size=self.batch, batch_format="numpy", prefetch_batches=1):
            yield self.layout.collate([{k: b[k][i] for k in ("input_ids", "labels")}
                                       for i in range(len(b["input_ids"]))])


# ----------------------------------------------------------------------------- the trainer


class Counter:
    """Tokens this worker actually trained on (batches skipped to reach a resume point are not counted)."""

    def __init__(self):
        self.tokens = self.trained = 0


class RayDataSFTTrainer(SFTTrainer):
    """SFTTrainer fed from Ray Data shards, with the loss computed where it is trained.

    ``fused_lm_head=False`` computes the LM head only at the positions whose next token is trained (the
    assistant turns), through the model's ``logits_to_keep``: the same loss as the model's own, without
    the prompt positions' ``vocab``-wide logits; ``True`` uses TRL's chunked (fused) LM-head loss."""

    def __init__(self, *args, ray_train, ray_eval, counter: Counter, trace=None, fused_lm_head=True, **kwargs):
        self._ray_train, self._ray_eval, self._counter, self._trace = ray_train, ray_eval, counter, trace
        self._fused_lm_head = fused_lm_head
        super().__init__(*args, **kwargs)
        base = self.accelerator.unwrap_model(self.model)
        forward = getattr(getattr(base, "get_base_model", lambda: base)(), "forward", None)
        self._keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(self._ray_train, batch_size=None)

    def get_eval_dataloader(self, eval_dataset=None):
        return torch.utils.data.DataLoader(self._ray_eval, batch_size=None)

    def training_step(self, model, inputs, *args, **kwargs):
        ids = inputs.pop("example_id", None)
        self._counter.tokens += int(inputs.pop("num_tokens", 0))
        self._counter.trained += int((inputs["labels"] != IGNORE_INDEX).sum())
        if ids is not None and self._trace is not None:
            self._trace(self.state.global_step + 1, ids)
        return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop("example_id", None)
        inputs.pop("num_tokens", None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._fused_lm_head or not self._keeps_logits:
            self.loss_is_scaled_for_ga = None
            if self._fused_lm_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from transformers import Trainer

            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return self._trained_positions_loss(model, inputs, return_outputs, num_items_in_batch)

    def _trained_positions_loss(self, model, inputs, return_outputs, num_items_in_batch):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # positions predicting a trained token
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        inputs["use_cache"] = False
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits
        targets = targets[:, keep]
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        if num_items_in_batch is None:  # evaluation: the batch's own mean
            self.loss_is_scaled_for_ga = False
            loss = nll / (targets != IGNORE_INDEX).sum().clamp(min=1)
        else:  # normalised by every trained token of the step (all micro-batches, all ranks), as the model's own
            self.loss_is_scaled_for_ga = True
            loss = nll / torch.as_tensor(num_items_in_batch, device=nll.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


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


class RayReport(TrainerCallback):
    """Progress lines on rank 0, and every Trainer checkpoint reported to Ray Train (all ranks)."""

    def __init__(self, rank: int, plan: Plan, counter: Counter):
        self.rank, self.plan, self.counter = rank, plan, counter
        self.t0 = self.t_last = time.time()
        self.tok0 = self.tok_last = 0
        self.latest: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def _global_tokens(self) -> tuple[int, int]:
        tokens, trained = collectives.sum_ints([self.counter.tokens, self.counter.trained])
        return tokens, trained

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
        if self.plan.steps_per_epoch:  # Trainer cannot know epochs of a stream; the plan does
            done = min(state.global_step * self.plan.rows_per_step // self.plan.workers, self.plan.rows_to_train)
            logs["epoch"] = round(done / self.plan.rows_per_worker, 3)
        logs.update(step=state.global_step, tokens=tokens, trained_tokens=trained,
                    avg_tokens_per_s=round((tokens - self.tok0) / max(now - self.t0, 1e-9), 2))
        self.latest.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        self.history.append(logs)
        if self.rank == 0:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                             if k in ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch"))
            say(f"step {state.global_step}/{self.plan.max_steps} {shown}")

    def on_save(self, args, state, control, **kw):
        import ray.train

        ckpt = Path(args.output_dir, f"checkpoint-{state.global_step}")
        export.mark_complete(ckpt, state.global_step)
        metrics = {**self.latest, "step": state.global_step}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)),
                         checkpoint_dir_name=f"checkpoint-{state.global_step:07d}")
        shutil.rmtree(ckpt, ignore_errors=True)  # the local copy is uploaded; keep disk use flat on long runs


# ----------------------------------------------------------------------------- the recipe


def _quiet_logs() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    noisy = list(NOISY_LOGGERS)
    try:  # Ray Train logs every report at INFO, under the module's *file path* as the logger name
        from ray.train.v2._internal.execution import context as _ray_train_context

        noisy.append(_ray_train_context.__file__)
    except ImportError:
        pass
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)


def _sft_config(cfg: Config, plan: Plan, out: Path, precision: str, on_gpu: bool, eval_steps: int | None):
    """The SFTConfig, built before the model: under ZeRO-3 its DeepSpeed dict is what makes transformers
    partition the weights at load time instead of loading them whole on every rank."""
    from trl import SFTConfig

    from sft_ray import deepspeed as ds_builder

    t = cfg.train
    report_to = t.report_to or (["tensorboard"] if importlib.util.find_spec("tensorboard") else ["none"])
    if "tensorboard" in report_to:  # rank 0 writes; on one node this is the run's own folder
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir, "tensorboard").resolve())
    return SFTConfig(
        output_dir=str(out), max_steps=plan.max_steps,
        per_device_train_batch_size=t.per_device_batch_size, per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16", gradient_checkpointing=t.gradient_checkpointing,
        use_liger_kernel=t.liger_kernel, logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
        prediction_loss_only=True, report_to=report_to,
        deepspeed=ds_builder.build(cfg.deepspeed, on_gpu, precision), use_cpu=not on_gpu,
        seed=cfg.seed, data_seed=cfg.seed, dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False, dataloader_num_workers=0, max_length=None, disable_tqdm=True,
        log_level="warning", log_level_replica="error", save_only_model=False,
    )


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: set up, restore, build the trainer, train, export."""
    import datasets
    import ray.train
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from transformers import PrinterCallback

    from sft_ray import deepspeed as ds_setup
    from sft_ray.modeling import check_target_modules, choose_precision, load_model, load_tokenizer

    _quiet_logs()
    cfg = Config.model_validate(loop_cfg["cfg"])
    plan = Plan(**loop_cfg["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    collectives.install_guard_from_env(rank)

    # set up: device, precision, DeepSpeed's adoption of Ray Train's process group
    # what Ray Train gave this worker, not what the node has: with train.use_gpu=false on a GPU node the GPUs
    # are still visible (Ray 2.60 no longer hides them from a worker given none), and the run stays on the CPU
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks one (it is first imported below)
    precision = choose_precision(cfg.train.precision, on_gpu)
    fused = on_gpu if cfg.train.fused_lm_head == "auto" else cfg.train.fused_lm_head
    if rank == 0:
        say(f"worker: {'cuda' if on_gpu else 'cpu'}, precision {precision}, {world} workers, "
            f"torch threads {torch.get_num_threads()}, ZeRO {cfg.deepspeed.zero_stage if cfg.deepspeed.enabled else 'off'}, "
            f"loss {'fused LM head (TRL)' if fused else 'LM head on trained positions only'}")
    if cfg.deepspeed.enabled:
        # Ray Train already set up torch.distributed; DeepSpeed's comm layer must adopt it *now*, or
        # zero.Init inside from_pretrained (ZeRO-3) sees a world of 1 and rejects the batch config.
        ds_setup.init_distributed(on_gpu, say=say)

    # restore
    local = Path(tempfile.mkdtemp(prefix=f"sft-ray-{cfg.train.name}-rank{rank}-"))
    checkpoint = ray.train.get_checkpoint()
    stored, from_storage = loop_cfg.get("stored_checkpoint"), False
    if stored is not None and (checkpoint is None or export.step_of(checkpoint.path) < stored["step"]):
        checkpoint, from_storage = stored["checkpoint"], True  # newer than Ray Train's record of the run
    resume_dir, step = None, 0
    if checkpoint is not None and export.final_problem(checkpoint.filesystem, checkpoint.path) is None:
        # the run had finished (a restart after the final report): Ray Train's latest checkpoint is the final
        # model already. Reporting it again would register the same folder twice, and the older entry's
        # eviction (keep_checkpoints) would delete the folder both point to
        shutil.rmtree(local, ignore_errors=True)
        return
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory(str(local / "resume")))
        step = export.check_checkpoint(resume_dir, world, cfg)
        if rank == 0:
            where = "; found in storage, not yet in Ray Train's record of the run" if from_storage else ""
            say(f"resuming from checkpoint at step {step} ({checkpoint.path}{where})")

    # build the trainer
    tok = load_tokenizer(cfg.model)
    eval_steps = cfg.train.eval_steps if plan.has_eval and cfg.train.eval_steps else None
    args = _sft_config(cfg, plan, local / "trainer", precision, on_gpu, eval_steps)
    model = load_model(cfg.model, tok, precision, cfg.lora.quantize_4bit, zero3=cfg.deepspeed.enabled
                       and cfg.deepspeed.zero_stage == 3)
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        check_target_modules(model, cfg.lora.target_modules)
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    layout = Layout(tok.pad_token_id, cfg.data.packing, cfg.data.max_length,
                    flat="flash" in (cfg.model.attn_implementation or ""))
    # resumed from the last step's checkpoint (the Trainer always saves it; a stop before the export leaves it):
    # the Trainer would start another epoch from the first row and train a step past the end. With no batch it
    # loads the checkpoint, trains nothing, and the run goes on to its eval and export
    train_stream = [] if step >= plan.max_steps else TrainStream(
        ray.train.get_dataset_shard(loop_cfg["train_dataset"].format(rank=rank)), plan,
        cfg.train.per_device_batch_size, cfg.train.grad_accum, layout, cfg.data.shuffle_buffer, cfg.seed)
    eval_stream = (EvalStream(ray.train.get_dataset_shard("eval"), cfg.train.per_device_batch_size,
                              tok.pad_token_id) if plan.has_eval else None)
    datasets.disable_caching()
    # SFTTrainer peeks at one row of train_dataset for its checks; the real data comes from the Ray shard. The
    # fingerprint is given: hashing the table goes through dill, whose stdout capture races with other threads
    # and dumps bytecode into the job's log
    sample = Dataset(InMemoryTable.from_pydict({"input_ids": [[tok.eos_token_id] * 2],
                                                "labels": [[tok.eos_token_id] * 2]}), fingerprint="sft-ray-sample")
    counter = Counter()
    report = RayReport(rank, plan, counter)
    trace = ExampleTrace(Path(loop_cfg["output_dir"], "trace", f"rank{rank}.jsonl")) if cfg.train.trace_examples else None
    trainer = RayDataSFTTrainer(
        model=model, args=args, processing_class=tok, train_dataset=sample, peft_config=peft_config,
        eval_dataset=sample if eval_stream is not None else None, callbacks=[report],
        ray_train=train_stream, ray_eval=eval_stream, counter=counter, trace=trace, fused_lm_head=fused,
    )
    trainer.remove_callback(PrinterCallback)

    # train
    try:
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    except Exception as e:  # a bad row in a streamed shard: hand the driver the reason itself, not Ray Data's
        from sft_ray.data import DataError, find_data_error  # wrapper (whose cause is lost on the way)

        found = find_data_error(e)
        if found is None:
            raise
        raise DataError(found) from e
    restored = {k: h[k] for h in trainer.state.log_history for k in ("loss", "eval_loss") if k in h}  # (resumed)
    final = {**restored, **report.latest, "step": trainer.state.global_step, "precision": precision}  # (model card)
    # transformers evaluates at the last step whenever eval_steps is set (DefaultFlowCallback): not again here
    evaluated_last_step = bool(eval_steps) and "eval_loss" in report.latest
    if eval_stream is not None and not evaluated_last_step:  # (the last step's eval is the final one)
        final.update(trainer.evaluate())
    final.update(peak_memory())

    # export: every rank joins (the ZeRO-3 16-bit gather is collective); rank 0 writes the folder
    folder = export.export_model(trainer, tok, cfg, local / "export", rank, report.history, final)
    ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None,
                     checkpoint_dir_name=export.FINAL_DIR)
    shutil.rmtree(local, ignore_errors=True)


def peak_memory() -> dict[str, list[float]]:
    """Peak memory of every worker (MiB): process RSS, and CUDA allocations on GPU; all ranks take part."""
    import resource

    mine = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "cuda": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}
    every = collectives.gather_objects(mine)
    out = {"peak_rss_mib_per_worker": [round(m["rss"], 1) for m in every]}
    if torch.cuda.is_available():
        out["peak_cuda_mib_per_worker"] = [round(m["cuda"], 1) for m in every]
    return out

