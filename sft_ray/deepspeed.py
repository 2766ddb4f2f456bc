"""DeepSpeed ZeRO config from the typed config.

Batch size, accumulation, clipping and precision are left as ``"auto"`` so transformers fills them
from the SFTConfig: one source of truth, no mismatch between Trainer and DeepSpeed.
"""

from __future__ import annotations

from typing import Any


def build(ds_cfg, on_gpu: bool, precision: str) -> dict[str, Any] | None:
    if not ds_cfg.enabled:
        return None
    zero: dict[str, Any] = {"stage": ds_cfg.zero_stage}
    if ds_cfg.zero_stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size="auto")
    if ds_cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # the 16-bit gather is what makes save_model write real weights instead of empty shards
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # Trainer logs; DeepSpeed's own step prints would duplicate them
        "wall_clock_breakdown": False,
        # the optimizer is Trainer's (torch AdamW); with offload, DeepSpeed's CPU Adam is used
        "zero_allow_untested_optimizer": True,
    }
