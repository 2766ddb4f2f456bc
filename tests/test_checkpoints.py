"""A checkpoint that is not complete is never resumed from; the final export is swapped in atomically."""

import json

import pytest

from sft_ray.train import FINAL_MARKER, check_checkpoint, export_final


def _ckpt(path, step=6, shards=2):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for r in range(shards):
        (path / f"global_step{step}").mkdir(exist_ok=True)
        (path / f"global_step{step}" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    return path


def test_complete_checkpoint_gives_its_step(tmp_path):
    assert check_checkpoint(_ckpt(tmp_path / "c"), world=2, sharded=True) == 6


def test_missing_trainer_state_is_refused(tmp_path):
    c = _ckpt(tmp_path / "c")
    (c / "trainer_state.json").unlink()
    with pytest.raises(RuntimeError, match="incomplete: no trainer_state.json"):
        check_checkpoint(c, world=2, sharded=True)


def test_missing_rank_shard_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="1 optimizer shards for 2 workers"):
        check_checkpoint(_ckpt(tmp_path / "c", shards=1), world=2, sharded=True)


def _real(src):
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(src))


def _dies_mid_download(src):
    """A real Checkpoint whose download fails after writing part of the files (injected fault)."""
    from ray.train import Checkpoint

    class Flaky(Checkpoint):
        def to_directory(self, path=None):
            super().to_directory(path)
            raise OSError("connection lost mid-download")

    return Flaky.from_directory(str(src))


def test_export_never_leaves_a_half_written_model(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "model.safetensors").write_text("v1")
    (good / FINAL_MARKER).write_text("{}")
    dest = tmp_path / "model"
    export_final(_real(good), dest)
    assert (dest / "model.safetensors").read_text() == "v1"
    # a download that dies half way leaves the previous export untouched
    with pytest.raises(OSError):
        export_final(_dies_mid_download(good), dest)
    assert (dest / "model.safetensors").read_text() == "v1"
    # a checkpoint that is not a finished model is refused, the previous export stays
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.safetensors").write_text("v2")
    with pytest.raises(RuntimeError, match="not a finished model"):
        export_final(_real(partial), dest)
    assert (dest / "model.safetensors").read_text() == "v1"
