"""A checkpoint that is not complete is never resumed from; the final export is swapped in atomically."""

import json

import pytest

from sft_ray.config import load_config
from sft_ray.export import FINAL_MARKER, check_checkpoint, export_final, mark_complete


def _ckpt(path, step=6, world=2, zero=2, drop=None):
    """A checkpoint as the ranks leave it: the Trainer's files, DeepSpeed's, and each rank's manifest."""
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    gs = path / f"global_step{step}"
    gs.mkdir()
    (gs / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    per_rank = {r: [f"rng_state_{r}.pth"] + ([f"global_step{step}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"]
                                              if zero else []) for r in range(world)}
    for r, files in per_rank.items():
        for f in files:
            (path / f).write_bytes(b"x" * (10 + r))
        listed = {f: 10 + r for f in files}
        if r == 0:
            listed.update({"trainer_state.json": (path / "trainer_state.json").stat().st_size,
                           f"global_step{step}/mp_rank_00_model_states.pt": 100})
        (path / f"sft_ray_manifest_rank{r}.json").write_text(json.dumps({"step": step, "files": listed}))
    if drop:
        (path / drop).unlink()
    return path


def _cfg(zero):
    return load_config(None, [f"deepspeed.zero_stage={zero}"])


@pytest.mark.parametrize("zero", [0, 2])
def test_complete_checkpoint_gives_its_step(tmp_path, zero):
    assert check_checkpoint(_ckpt(tmp_path / "c", zero=zero), world=2, cfg=_cfg(zero)) == 6


@pytest.mark.parametrize("drop, reason", [
    ("trainer_state.json", "incomplete: no trainer_state.json"),
    ("sft_ray_manifest_rank1.json", "1 rank manifests for 2 workers"),
    ("rng_state_1.pth", "rng_state_1.pth \\(from sft_ray_manifest_rank1.json\\) is missing"),
    ("global_step6/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "optim_states.pt .* is missing"),
])
def test_incomplete_checkpoint_is_refused(tmp_path, drop, reason):
    with pytest.raises(RuntimeError, match=reason):
        check_checkpoint(_ckpt(tmp_path / "c", drop=drop), world=2, cfg=_cfg(2))


def test_zero0_checkpoint_needs_deepspeeds_model_and_optimizer_file(tmp_path):
    c = _ckpt(tmp_path / "c", zero=0, world=1)
    (c / "global_step6" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 40)  # cut short after the manifest
    with pytest.raises(RuntimeError, match="mp_rank_00_model_states.pt .* is 40 bytes, not 100"):
        check_checkpoint(c, world=1, cfg=_cfg(0))


def test_manifest_lists_every_file_with_its_size(tmp_path):
    c = tmp_path / "c"
    (c / "global_step3").mkdir(parents=True)
    (c / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (c / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"abc")
    mark_complete(c, 3)
    listed = json.loads((c / "sft_ray_manifest_rank0.json").read_text())
    assert listed["step"] == 3 and listed["files"]["global_step3/mp_rank_00_model_states.pt"] == 3
    assert check_checkpoint(c, world=1, cfg=_cfg(0)) == 3


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


def test_newest_complete_checkpoint_in_storage_is_found_without_ray_trains_record(tmp_path):
    """A driver stopped between the workers' upload and Ray Train's record of it leaves a complete checkpoint
    that only a scan of the storage folder finds; a newer one cut short is skipped with its reason."""
    import pyarrow.fs as pafs

    from sft_ray.export import latest_checkpoint

    run = tmp_path / "store" / "ft"
    _ckpt(run / "checkpoint-0000003", step=3)
    _ckpt(run / "checkpoint-0000006", step=6)
    _ckpt(run / "checkpoint-0000009", step=9, drop="rng_state_1.pth")  # upload cut short
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    fs, path = pafs.FileSystem.from_uri(f"file://{run}")  # as storage URIs (s3://, gs://) are opened
    found = latest_checkpoint(fs, path, world=2, cfg=_cfg(2))
    assert (found.step, found.path.rsplit("/", 1)[-1]) == (6, "checkpoint-0000006")
    assert len(found.skipped) == 1 and "checkpoint-0000009" in found.skipped[0] and "rng_state_1.pth" in found.skipped[0]
    # ZeRO-2 state of 2 ranks does not resume a 3-worker run
    assert latest_checkpoint(fs, path, world=3, cfg=_cfg(2)).path is None
    assert latest_checkpoint(fs, f"{path}/missing", world=2, cfg=_cfg(2)).path is None


def test_final_model_whose_upload_was_cut_short_is_not_finished(tmp_path):
    """The final marker lists every file of the model with its size, so a partial upload that happens to
    include the marker is not taken for a finished run."""
    import pyarrow.fs as pafs

    from sft_ray.export import FILES_KEY, final_metrics, final_problem

    f = tmp_path / "final_model"
    f.mkdir()
    (f / "model.safetensors").write_bytes(b"w" * 50)
    (f / FINAL_MARKER).write_text(json.dumps({"loss": 1.5, FILES_KEY: {"model.safetensors": 50}}))
    assert final_problem(pafs.LocalFileSystem(), str(f)) is None and final_metrics(f) == {"loss": 1.5}
    (f / "model.safetensors").write_bytes(b"w" * 20)
    assert final_problem(pafs.LocalFileSystem(), str(f)) == "model.safetensors is 20 bytes, not 50"
    for cut in ('{"loss": 1.5, "fi', "", "[]"):  # an upload that stopped inside the marker: not finished, no crash
        (f / FINAL_MARKER).write_text(cut)
        assert final_problem(pafs.LocalFileSystem(), str(f)).startswith(f"{FINAL_MARKER} is unreadable")
    (f / FINAL_MARKER).write_text(json.dumps({"loss": 1.5, FILES_KEY: {"model.safetensors": 50}}))
    (f / "model.safetensors").unlink()
    assert final_problem(pafs.LocalFileSystem(), str(f)) is not None
    with pytest.raises(RuntimeError, match="not a finished model: model.safetensors is missing"):
        export_final(_real(f), tmp_path / "model")


def test_local_storage_uri_that_does_not_exist_yet_is_created_not_refused(tmp_path):
    """``train.storage_path=file:///new/folder`` is a folder Ray Train would create itself; the write check makes
    it instead of refusing it (a missing *bucket* is still refused: tests/test_object_storage.py)."""
    from sft_ray.cluster import check_storage_writable
    from sft_ray.config import ConfigError

    store = tmp_path / "new" / "store"
    check_storage_writable(f"file://{store}")
    assert store.is_dir() and list(store.iterdir()) == []  # the marker is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"train.storage_path=file://{blocker}/store cannot be written"):
        check_storage_writable(f"file://{blocker}/store")
