"""The run plan: what the driver decides from the validated data, and the contract it hands every worker.

An optimizer step always takes ``num_workers x per_device_batch_size x grad_accum`` rows, packed or not,
so the steps of an epoch depend on the row count only, never on how long the rows are. An epoch is exact:
each worker trains every row of its shard once (the last step of an epoch may be smaller); what Ray's
equal split leaves out is fewer than ``num_workers`` rows, so that every worker has the same number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sft_ray.config import Config


class PlanError(ValueError):
    pass


@dataclass
class Plan:
    max_steps: int
    steps_per_epoch: int  # 0 when the row count is unknown (a stream that was not counted first)
    rows: int  # usable training rows (weighted), 0 when unknown
    rows_per_worker: int  # one epoch of a worker's shard
    rows_per_step: int  # all workers
    workers: int
    rows_to_train: int  # per worker, over the whole run; 0 = until max_steps (unknown row count)
    tokens_per_step: int  # expected (mean row length x rows per step)
    epochs: float
    has_eval: bool
    eval_source: str = ""

    @property
    def passes(self) -> int:
        """Passes over a worker's shard the run needs (0: unknown, stream until max_steps)."""
        return math.ceil(self.rows_to_train / self.rows_per_worker) if self.rows_to_train else 0

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, cfg: Config) -> str:
        t = cfg.train
        epoch = f"{self.steps_per_epoch}/epoch, {self.epochs:.3g} epochs" if self.steps_per_epoch else "row count unknown"
        return (f"plan: {self.max_steps} optimizer steps ({epoch}); {self.rows_per_step} rows per step "
                f"({t.num_workers} workers x {t.per_device_batch_size} rows x accum {t.grad_accum}"
                f"{', packed' if cfg.data.packing else ''}), ~{self.tokens_per_step} tokens per step; "
                f"eval: {self.eval_source}")


def plan_run(cfg: Config, rows: int, mean_tokens: float, has_eval: bool, eval_source: str) -> Plan:
    """The plan for ``rows`` usable training rows (0: not counted, needs ``train.max_steps``)."""
    t = cfg.train
    per_worker_step = t.per_device_batch_size * t.grad_accum
    rows_per_step = per_worker_step * t.num_workers
    tokens = round(mean_tokens * rows_per_step)
    if rows == 0:
        if t.max_steps is None:
            raise PlanError("data.validate_first=false with data.shuffle=stream needs train.max_steps "
                            "(an uncounted stream has no length)")
        return Plan(t.max_steps, 0, 0, 0, rows_per_step, t.num_workers, 0, tokens, 0.0, has_eval, eval_source)
    per_worker = rows // t.num_workers
    if per_worker == 0:
        raise PlanError(f"{rows} training rows are too few for {t.num_workers} workers: each needs at least one")
    spe = math.ceil(per_worker / per_worker_step)
    if t.max_steps is not None:
        to_train = t.max_steps * per_worker_step
        max_steps = t.max_steps
    else:
        to_train = max(1, round(t.num_epochs * per_worker))
        max_steps = math.ceil(to_train / per_worker_step)
    return Plan(max_steps=max_steps, steps_per_epoch=spe, rows=rows, rows_per_worker=per_worker,
                rows_per_step=rows_per_step, workers=t.num_workers, rows_to_train=to_train, tokens_per_step=tokens,
                epochs=round(to_train / per_worker, 4), has_eval=has_eval, eval_source=eval_source)


def step_sizes(rows: int, batch: int, accum: int) -> list[int]:
    """Rows in each of the ``accum`` micro-batches of a step that trains ``rows`` (<= batch x accum) rows: as
    even as possible, full micro-batches first; 0 marks a micro-batch with nothing left to train (the
    Trainer always takes ``accum`` of them per step)."""
    if rows >= batch * accum:
        return [batch] * accum
    base, extra = divmod(rows, accum)
    return [base + (1 if i < extra else 0) for i in range(accum)]
