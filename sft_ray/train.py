"""The driver: data -> checks -> plan -> ``TorchTrainer`` -> the exported model on disk.

What each worker runs is ``sft_ray.worker.train_loop``. Everything that can be known before the workers
start is checked here first, so that a run either does what its config says or stops with the reason: the
cluster can place the workers, storage is shared, the data is valid, and any checkpoints found under the
run's name were written by this very config and data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_ray import cluster, export, identity
from sft_ray.cluster import init_ray, say
from sft_ray.config import Config, dump_config

PROBE_FILE, FINAL_DIR = export.PROBE_FILE, export.FINAL_DIR


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (imported there, so the driver never loads TRL)."""
    from sft_ray.worker import train_loop as recipe

    recipe(loop_cfg)


def resolve_data(cfg: Config) -> tuple[list[str], list[str]]:
    """Data specs for train and eval; ``generated[:TASK]`` writes a built-in task under ``output_dir/data``,
    and, where ``train.storage_path`` is a URI (object storage, or ``file://`` on a shared mount), also beside
    the runs there (``{storage_path}/.sft-ray-generated/{train.name}/``), read from there: on a cluster the
    data tasks run on other nodes than the driver, which do not have its disk."""
    from sft_ray import synthetic

    out: dict[str, tuple[str, str]] = {}

    def files(spec: str) -> tuple[str, str]:
        task = synthetic.task_of(spec)
        if task not in out:
            sub = [] if task == synthetic.DEFAULT_TASK else [task]
            folder = Path(cfg.output_dir, "data", *sub)
            tr, ev = synthetic.write_task(folder, cfg.data.generated_train_rows, cfg.data.generated_eval_rows,
                                          cfg.seed, task)
            out[task] = (str(tr), str(ev))
            if "://" in cfg.storage_path:  # beside the run's folder, not in it: train.resume=false deletes that
                out[task] = tuple(_upload(p, "/".join([cfg.storage_path.rstrip("/"), GENERATED_DIR, cfg.train.name,
                                                       *sub, Path(p).name])) for p in out[task])
        return out[task]

    train = [files(s)[0] if synthetic.is_generated(s) else s for s in cfg.data.train]
    evals = [files(s)[1] if synthetic.is_generated(s) else s for s in cfg.data.eval]
    return train, evals


GENERATED_DIR = ".sft-ray-generated"


def _upload(path: str, uri: str) -> str:
    import pyarrow.fs as pafs

    from sft_ray.sources import SourceError, shown_uri

    try:
        fs, dest = pafs.FileSystem.from_uri(uri)
        if fs.type_name == "local":  # file://: a shared mount, say; a bucket needs no folders
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(dest) as f:
            f.write(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise SourceError(f"{shown_uri(uri)}: cannot write the generated data there (train.storage_path): {e}") \
            from None
    return uri


def eval_source(cfg: Config) -> str:
    if cfg.data.eval:
        return f"data.eval={cfg.data.eval}"
    if cfg.data.eval_fraction > 0:
        return f"a seeded {cfg.data.eval_fraction:.0%} of the train rows (data.eval_fraction={cfg.data.eval_fraction})"
    return "none (set data.eval or data.eval_fraction to measure held-out loss and scores)"


@dataclass
class Prepared:
    datasets: dict[str, Any]
    train_dataset: str  # the dataset name a worker reads: "train_{rank}" (exact shards) or "train" (streamed)
    stats: dict[str, Any]
    rows: int
    digest: str
    mean_tokens: float


def prepare_data(cfg: Config, train_specs: list[str], eval_specs: list[str], fit: cluster.Fit) -> Prepared:
    """Tokenize, validate and order the data; hand each worker its shard.

    ``data.shuffle=global`` (default): everything is tokenized once, validated, put in a seeded global order
    and cut into one exact shard per worker before the workers start (Ray's object store holds it, spilling to
    disk when it must); nothing needs a CPU while they train. ``stream``: rows are read and tokenized while
    training, in file order with a local shuffle buffer, for data too large to hold."""
    from sft_ray import data

    out = Path(cfg.output_dir)
    streaming = cfg.data.shuffle == "stream"
    cpus = cluster.streaming_data_cpus(cfg, fit) if streaming else cfg.data.tokenize_cpus
    train_tok, eval_tok = data.splits(train_specs, eval_specs, cfg, num_cpus=cpus)
    if not streaming:
        train_tok = train_tok.materialize()
    stats: dict[str, Any] = {}
    for name, ds, specs in (("train", train_tok, train_specs), ("eval", eval_tok, eval_specs or train_specs)):
        if ds is None or (name == "train" and streaming and not cfg.data.validate_first):
            continue
        st = data.validate(ds, name)
        say(f"{name} data: {st.summary()}")
        data.check(st, name, cfg.data.on_bad_rows, specs)
        empty = data.empty_files(st, specs) if name == "train" else []
        if empty:
            say(f"warning: no usable rows in {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        if st.bad:
            rejects = out / f"rejects-{name}"
            data.write_rejects(ds, rejects)
            say(f"skipped {st.bad} bad {name} row(s); reasons in {rejects}/")
        stats[name] = st
    datasets: dict[str, Any] = {}
    if eval_tok is not None:  # small by nature: materialized once (in the object store), not re-tokenized per eval
        datasets["eval"] = data.trainable(eval_tok, cfg.data.on_bad_rows, cfg.data.tokenize_cpus).materialize()
    tr = stats.get("train")
    rows, digest = (tr.rows, tr.digest) if tr else (0, "")
    mean = tr.tokens / max(tr.rows, 1) if tr else 0.0
    with_ids = cfg.train.trace_examples
    if streaming:
        datasets["train"] = data.trainable(train_tok, cfg.data.on_bad_rows, cpus, with_ids=with_ids)
        return Prepared(datasets, "train", stats, rows, digest, mean)
    nbytes = (tr.tokens * 16 + tr.rows * (64 if with_ids else 16)) if tr else None  # ids and labels as int64
    ordered = data.global_order(data.trainable(train_tok, cfg.data.on_bad_rows, cpus, with_ids=with_ids,
                                               order_seed=cfg.seed), nbytes).materialize()
    per = ordered.count() // cfg.train.num_workers
    if per == 0:
        from sft_ray.plan import PlanError

        raise PlanError(f"{rows} training rows are too few for {cfg.train.num_workers} workers")
    shards = ordered.split_at_indices([per * (i + 1) for i in range(cfg.train.num_workers)])
    datasets.update({f"train_{i}": shards[i] for i in range(cfg.train.num_workers)})
    return Prepared(datasets, "train_{rank}", stats, rows, digest, mean)


def _ingest_config(split: list[str]):
    """Order preserved: every attempt hands each worker the same rows in the same order, so a resumed run
    skips exactly the batches the checkpoint had consumed and trains on the rest, as an uninterrupted one."""
    import warnings

    import ray.train

    with warnings.catch_warnings():  # Ray's own defaults use a field it has deprecated
        warnings.simplefilter("ignore")
        opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=split, execution_options=opts)


def _finished_checkpoint(cfg: Config):
    """The final model of this run in Ray storage, if the run finished (and its upload was not cut short)."""
    import ray.train

    fs, d = identity.run_dir(cfg.storage_path, cfg.train.name)
    final = f"{d}/{FINAL_DIR}"
    if not identity.exists(fs, final) or export.final_problem(fs, final) is not None:
        return None
    return ray.train.Checkpoint(path=final, filesystem=fs)


def _stored_checkpoint(cfg: Config) -> dict[str, Any] | None:
    """The newest complete checkpoint in the run's storage folder, for the workers to resume from when Ray
    Train's own record of the run lacks it (see ``export.latest_checkpoint``)."""
    import ray.train

    fs, d = identity.run_dir(cfg.storage_path, cfg.train.name)
    found = export.latest_checkpoint(fs, d, cfg.train.num_workers, cfg)
    for why in found.skipped:
        say(f"not resuming from {why}")
    if found.path is None:
        return None
    return {"checkpoint": ray.train.Checkpoint(path=found.path, filesystem=fs), "step": found.step}


def run(cfg: Config) -> dict[str, Any]:
    """Train and export; returns a summary (paths, counts, timings, metrics)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from sft_ray.plan import plan_run

    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for note in cfg.notes:
        say(note)
    train_specs, eval_specs = resolve_data(cfg)
    init_ray(cfg)
    from sft_ray import data

    # checks that need no data: the cluster can place the workers, storage is shared
    on_gpu = cluster.use_gpu(cfg)
    cluster.check_gpu_only_options(cfg, on_gpu)
    fit = cluster.check_resources(cfg, on_gpu)  # before warming: its tasks would count as other work's CPUs
    data.warm_workers()  # idle workers import the pipeline's code while the checks below and the tokenizer load run
    cluster.check_storage_shared(cfg.storage_path)
    if cfg.export.to:
        cluster.check_storage_writable(cfg.export.to, "export.to", "The finished model folder is copied there")

    # the data, and the run's identity (its result-changing config + a digest of its tokenized data)
    prep = prepare_data(cfg, train_specs, eval_specs, fit)
    ident = identity.make(cfg, prep.digest, prep.rows)
    if not cfg.train.resume:
        identity.clear(cfg.storage_path, cfg.train.name)
    state = identity.check(cfg, ident)
    if state == "new":
        identity.write(cfg.storage_path, cfg.train.name, ident)
    (out / "config.yaml").write_text(dump_config(cfg))
    summary: dict[str, Any] = {"data": {k: v.to_dict() for k, v in prep.stats.items()}}
    plan = plan_run(cfg, prep.rows, prep.mean_tokens, "eval" in prep.datasets, eval_source(cfg))
    summary["plan"] = plan.to_dict()

    finished = _finished_checkpoint(cfg) if state == "same" else None
    stored = _stored_checkpoint(cfg) if state == "same" and finished is None else None
    if finished is not None:
        say(f"run {cfg.train.name!r} already finished with this config and data ({cfg.storage_path}/"
            f"{cfg.train.name}); exporting its model again (train.resume=false trains it again)")
        result_checkpoint, train_s = finished, 0.0
    else:
        say(plan.line(cfg))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan.to_dict(),
                               "output_dir": str(out.resolve()), "train_dataset": prep.train_dataset,
                               "stored_checkpoint": stored},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.train.num_workers, use_gpu=on_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if on_gpu else {})},
                placement_strategy=cfg.train.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=cfg.train.name,
                storage_path=cfg.storage_path,
                # the last keep_checkpoints; when the run ends, the final model takes the oldest one's place
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            ),
            datasets=prep.datasets,
            dataset_config=_ingest_config(["eval"] if prep.train_dataset != "train" else ["train", "eval"]),
        )
        t_train = time.time()
        result = trainer.fit()
        train_s = time.time() - t_train
        if result.error:
            raise result.error
        result_checkpoint = result.checkpoint
    model_dir = export.export_final(result_checkpoint, out / "model")
    summary.update({
        "model_dir": str(model_dir),
        "checkpoint": result_checkpoint.path,
        "metrics": export.final_metrics(model_dir),
        "resumed_finished_run": finished is not None,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
    })
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
