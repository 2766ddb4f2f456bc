"""Checkpoints and the exported model: completeness checks, the consolidated Hugging Face folder, LoRA merge.

Every rank writes a manifest (its files and their sizes) into a checkpoint *after* the Trainer has saved
it; a checkpoint counts as complete only when every rank's manifest is there and every file it lists has
its size. The final model is written to a temporary folder and swapped in whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sft_ray.config import Config

FINAL_MARKER = "sft_ray_final.json"
FINAL_DIR = "final_model"
MANIFEST = "sft_ray_manifest_rank{rank}.json"
PROBE_FILE = "sft_ray_probe.pt"
PROBE_TEXT = "sft-ray export check: the quick brown fox jumps over the lazy dog."


def mark_complete(ckpt: Path, step: int) -> None:
    """This rank's manifest: every file it wrote into the checkpoint, with its size (written last)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ckpt.mkdir(parents=True, exist_ok=True)  # a rank that saved nothing still vouches for its (empty) part
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
             if p.is_file() and not p.name.startswith("sft_ray_manifest_")}
    tmp = ckpt / f".manifest-{rank}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}))
    os.replace(tmp, ckpt / MANIFEST.format(rank=rank))


def check_checkpoint(path: Path, world: int, cfg: Config | None = None) -> int:
    """The step of a complete training checkpoint; a clear error for one that is not.

    Ray Train registers a checkpoint only after every rank's upload has finished, so an interrupted upload
    is never handed back; this is the second line of defence (a hand-copied or half-synced folder)."""
    state = path / "trainer_state.json"
    if not state.is_file():
        raise RuntimeError(f"checkpoint {path} is incomplete: no trainer_state.json")
    step = int(json.loads(state.read_text())["global_step"])
    manifests = sorted(path.glob("sft_ray_manifest_rank*.json"))
    if len(manifests) != world:
        raise RuntimeError(f"checkpoint {path} is incomplete: {len(manifests)} rank manifests for {world} workers "
                           "(resume with the same train.num_workers it was written with)")
    for m in manifests:
        listed = json.loads(m.read_text())
        if int(listed["step"]) != step:
            raise RuntimeError(f"checkpoint {path} is inconsistent: {m.name} is of step {listed['step']}, the trainer "
                               f"state of step {step}")
        for name, size in listed["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                raise RuntimeError(f"checkpoint {path} is incomplete: {name} (from {m.name}) is "
                                   f"{'missing' if not f.is_file() else f'{f.stat().st_size} bytes, not {size}'}")
    if cfg is not None and cfg.deepspeed.enabled:  # the optimizer state DeepSpeed needs to resume
        shards = list(path.glob(f"global_step{step}/*optim_states.pt"))
        whole = list(path.glob(f"global_step{step}/mp_rank_*_model_states.pt"))
        if cfg.deepspeed.zero_stage == 0 and not whole:
            raise RuntimeError(f"checkpoint {path} is incomplete: no global_step{step}/mp_rank_00_model_states.pt "
                               "(DeepSpeed's model and optimizer state)")
        if cfg.deepspeed.zero_stage > 0 and len(shards) != world:
            raise RuntimeError(f"checkpoint {path} is incomplete: {len(shards)} optimizer shards for {world} workers")
    return step


def is_final(path: Path) -> bool:
    return (path / FINAL_MARKER).is_file()


def final_metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / FINAL_MARKER).read_text())


def export_model(trainer, tok, cfg: Config, dest: Path, rank: int, history: list, final: dict[str, Any]) -> Path:
    """The consolidated model folder (rank 0's ``dest``; every rank must call it: ZeRO-3 gathers collectively).

    Beside the weights: the tokenizer with its chat template, the generation config, the training history,
    and the trained model's logits on a fixed probe, so anyone can check that the folder reproduces the
    trained model (a ZeRO-3 export with missing gathers would not)."""
    import torch
    from transformers import GenerationConfig

    probe_ids = torch.tensor([tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]], device=trainer.args.device)
    trainer.model_wrapped.eval()
    with torch.no_grad():  # all ranks: under ZeRO-3 the forward gathers each layer's shards
        probe_logits = trainer.model_wrapped(input_ids=probe_ids).logits.float().cpu()
    trainer.save_model(str(dest))
    if rank != 0:
        return dest
    if cfg.lora.enabled:
        dest = lora_export(dest, cfg, tok)
    torch.save({"input_ids": probe_ids.cpu(), "logits": probe_logits}, dest / PROBE_FILE)
    tok.save_pretrained(str(dest))
    model = trainer.model
    gen = model.generation_config if getattr(model, "generation_config", None) is not None else \
        GenerationConfig.from_model_config(model.config)
    gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gen.save_pretrained(str(dest))
    (dest / "train_history.json").write_text(json.dumps(history, indent=1))
    (dest / FINAL_MARKER).write_text(json.dumps(final))
    return dest


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
    merged = load_merged(base, str(adapter_dir), tok, torch.float32, cfg.model.trust_remote_code,
                         revision=cfg.model.revision)
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    shutil.move(str(adapter_dir), str(merged_dir / "adapter"))
    return merged_dir


def export_final(checkpoint, dest: Path) -> Path:
    """Copy the final model out of Ray storage; swap it in only once complete."""
    dest = dest.resolve()
    tmp = dest.with_name(f".{dest.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    if not is_final(tmp):
        raise RuntimeError(f"the last checkpoint ({checkpoint.path}) is not a finished model")
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
