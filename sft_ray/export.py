"""Checkpoints and the exported model: completeness checks, the consolidated Hugging Face folder, LoRA merge.

Every rank writes a manifest (its files and their sizes) into a checkpoint *after* the Trainer has saved
it; a checkpoint counts as complete only when every rank's manifest is there and every file it lists has
its size. The final model is written to a temporary folder and swapped in whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_ray.config import Config

FINAL_MARKER = "sft_ray_final.json"
FINAL_DIR = "final_model"
FILES_KEY = "sft_ray_files"  # in the final marker: every other file of the final model, with its size
MANIFEST = "sft_ray_manifest_rank{rank}.json"
PROBE_FILE = "sft_ray_probe.pt"
UPLOADING = ".sft-ray-uploading"  # in an export.to folder while it is being written
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # Ray storage folder of a training checkpoint
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


def _listing(fs, path: str) -> dict[str, int]:
    """Every file under ``path`` with its size, in one listing call (local disk or object storage)."""
    import pyarrow.fs as pafs

    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File and i.path.startswith(base)}


def _size_problem(files: dict[str, int], name: str, size: int) -> str | None:
    """How a listed file differs from its record ('missing', or its other size), or None."""
    if files.get(name) == size:
        return None
    return "missing" if name not in files else f"{files[name]} bytes, not {size}"


def _read_json(fs, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _checkpoint_step(fs, path: str, world: int, cfg: Config | None) -> int:
    files = _listing(fs, path)
    if "trainer_state.json" not in files:
        raise RuntimeError(f"checkpoint {path} is incomplete: no trainer_state.json")
    step = int(_read_json(fs, f"{path}/trainer_state.json")["global_step"])
    manifests = sorted(n for n in files if re.fullmatch(r"sft_ray_manifest_rank\d+\.json", n))
    if len(manifests) != world:
        raise RuntimeError(f"checkpoint {path} is incomplete: {len(manifests)} rank manifests for {world} workers "
                           "(resume with the same train.num_workers it was written with)")
    for m in manifests:
        listed = _read_json(fs, f"{path}/{m}")
        if int(listed["step"]) != step:
            raise RuntimeError(f"checkpoint {path} is inconsistent: {m} is of step {listed['step']}, the trainer "
                               f"state of step {step}")
        for name, size in listed["files"].items():
            problem = _size_problem(files, name, size)
            if problem:
                raise RuntimeError(f"checkpoint {path} is incomplete: {name} (from {m}) is {problem}")
    if cfg is not None and cfg.deepspeed.enabled:  # the optimizer state DeepSpeed needs to resume
        shards = [n for n in files if n.startswith(f"global_step{step}/") and n.endswith("optim_states.pt")]
        whole = [n for n in files if re.fullmatch(rf"global_step{step}/mp_rank_\d+_model_states\.pt", n)]
        if cfg.deepspeed.zero_stage == 0 and not whole:
            raise RuntimeError(f"checkpoint {path} is incomplete: no global_step{step}/mp_rank_00_model_states.pt "
                               "(DeepSpeed's model and optimizer state)")
        if cfg.deepspeed.zero_stage > 0 and len(shards) != world:
            raise RuntimeError(f"checkpoint {path} is incomplete: {len(shards)} optimizer shards for {world} workers")
    return step


def check_checkpoint(path: Path, world: int, cfg: Config | None = None) -> int:
    """The step of a complete training checkpoint; a clear error for one that is not.

    Ray Train registers a checkpoint only after every rank's upload has finished, so an interrupted upload
    is never handed back; this is the second line of defence (a hand-copied or half-synced folder)."""
    import pyarrow.fs as pafs

    return _checkpoint_step(pafs.LocalFileSystem(), str(Path(path).resolve()), world, cfg)


@dataclass
class Found:
    """The newest complete training checkpoint under a run's folder in storage, and the newer ones skipped."""
    path: str | None
    step: int
    skipped: list[str]


def latest_checkpoint(fs, run_dir: str, world: int, cfg: Config) -> Found:
    """Scan the run's storage folder itself instead of trusting only Ray Train's record of it.

    Ray Train records a checkpoint some time after the workers have uploaded it (its controller polls them);
    a driver stopped in between leaves a complete checkpoint that Ray's record lacks, and the same command
    would silently train from step 0 again. Complete means every rank's manifest and every file it lists."""
    import pyarrow.fs as pafs

    dirs = [i for i in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
            if i.type == pafs.FileType.Directory and CHECKPOINT_NAME.fullmatch(i.base_name)]
    skipped: list[str] = []
    for d in sorted(dirs, key=lambda i: step_of(i.path), reverse=True):
        try:
            return Found(d.path, _checkpoint_step(fs, d.path, world, cfg), skipped)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            skipped.append(f"{d.base_name}: {e}")
    return Found(None, 0, skipped)


def step_of(checkpoint_path: str) -> int:
    """The step a checkpoint folder's name gives (``checkpoint-0000012``); the final model counts as last."""
    m = CHECKPOINT_NAME.fullmatch(checkpoint_path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 1 << 62


def final_problem(fs, path: str) -> str | None:
    """Why the folder is not a complete final model, or None. The marker is written last and lists every
    other file with its size, so a final model whose upload was cut short is never taken as finished."""
    files = _listing(fs, path)
    if FINAL_MARKER not in files:
        return f"no {FINAL_MARKER}"
    try:
        listed = _read_json(fs, f"{path}/{FINAL_MARKER}").get(FILES_KEY, {})  # absent: written by an older sft-ray
    except (ValueError, AttributeError) as e:  # cut short (an upload that stopped inside it), or not an object
        return f"{FINAL_MARKER} is unreadable ({type(e).__name__}: {e})"
    for name, size in listed.items():
        problem = _size_problem(files, name, size)
        if problem:
            return f"{name} is {problem}"
    return None


def final_metrics(path: Path) -> dict[str, Any]:
    marker = json.loads((path / FINAL_MARKER).read_text())
    marker.pop(FILES_KEY, None)
    return marker


def export_model(trainer, tok, cfg: Config, dest: Path, rank: int, history: list, final: dict[str, Any]) -> Path:
    """The consolidated model folder (rank 0's ``dest``; every rank must call it: ZeRO-3 gathers collectively).

    Beside the weights: the tokenizer with its chat template, the generation config, the training history,
    and the trained model's logits on a fixed probe, so anyone can check that the folder reproduces the
    trained model (a ZeRO-3 export with missing gathers would not)."""
    import torch
    from transformers import GenerationConfig

    from sft_ray.modeling import stop_token_ids

    probe_ids = torch.tensor([tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]], device=trainer.args.device)
    trainer.model_wrapped.eval()
    with torch.no_grad():  # all ranks: under ZeRO-3 the forward gathers each layer's shards
        probe_logits = trainer.model_wrapped(input_ids=probe_ids).logits.float().cpu()
    trainer.save_model(str(dest))
    if rank != 0:
        return dest
    (dest / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle of this machine's paths: not model
    if cfg.lora.enabled:
        dest = lora_export(dest, cfg, tok)
    torch.save({"input_ids": probe_ids.cpu(), "logits": probe_logits}, dest / PROBE_FILE)
    tok.save_pretrained(str(dest))
    model = trainer.model
    gen = model.generation_config if getattr(model, "generation_config", None) is not None else \
        GenerationConfig.from_model_config(model.config)
    gen.eos_token_id, gen.pad_token_id = stop_token_ids(tok, gen), tok.pad_token_id
    gen.save_pretrained(str(dest))
    (dest / "train_history.json").write_text(json.dumps(history, indent=1))
    files = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}
    tmp = dest / f".{FINAL_MARKER}.tmp"  # last, and whole or not at all: it vouches for the rest
    tmp.write_text(json.dumps({**final, FILES_KEY: files}))
    os.replace(tmp, dest / FINAL_MARKER)
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
    import pyarrow.fs as pafs

    problem = final_problem(pafs.LocalFileSystem(), str(tmp))
    if problem is not None:
        raise RuntimeError(f"the last checkpoint ({checkpoint.path}) is not a finished model: {problem}")
    _swap_in(tmp, dest)
    return dest


def _swap_in(tmp: Path, dest: Path) -> None:
    """``tmp`` (complete) becomes ``dest``; the previous ``dest`` is removed only once it has been moved aside."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def publish(model_dir: Path, uri: str) -> str:
    """Copy the finished model folder (weights, tokenizer, model card) to ``export.to``: object storage or a path.

    Whatever was there is removed first and an upload marker stays from the first byte to the last, with the
    final marker (which lists every file and its size) written just before it goes: a folder cut short is never
    taken for a model (``modeling.download_model`` refuses it). Returns the destination as given."""
    import pyarrow.fs as pafs

    src = Path(model_dir).resolve()
    if "://" not in uri or uri.startswith("file://"):  # a local folder: written beside it, swapped in whole
        dest = Path(uri.removeprefix("file://")).expanduser().resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.incoming")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        _swap_in(tmp, dest)
        return uri
    fs, root = pafs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    local = pafs.LocalFileSystem()
    with fs.open_output_stream(f"{root}/{UPLOADING}") as f:
        f.write(b"sft-ray: upload under way; this folder is not a complete model until this file is gone\n")
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):  # the previous export, if any
        if info.base_name == UPLOADING:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in [p for p in files if p.name != FINAL_MARKER] + [p for p in files if p.name == FINAL_MARKER]:
        pafs.copy_files(str(p), f"{root}/{p.relative_to(src).as_posix()}", source_filesystem=local,
                        destination_filesystem=fs)
    fs.delete_file(f"{root}/{UPLOADING}")
    return uri

