"""Corrupt checkpoints: a truncated or missing state file is reported as corrupt (naming the file), not as a model
mismatch; `latest` falls back to the newest complete, readable checkpoint and says so."""
from __future__ import annotations

import json
import shutil

import pytest

from diffusion.training import checkpoint as C

from .common import RF, reset_accelerate, rf_cfg

KW = dict(max_train_steps=3, checkpointing_steps=1, lr_scheduler="cosine", ema_decay=0.9)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A 3-step run with checkpoints at 1, 2, 3 and its losses."""
    root = tmp_path_factory.mktemp("full")
    reset_accelerate()
    res = RF.train(rf_cfg(root / "run", **KW))
    reset_accelerate()
    return root / "run", res["losses"]


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


FILES = ["optimizer.bin", "model.safetensors", "random_states_0.pkl", "ema_state.safetensors",
         "lr_scheduler_state.safetensors", "denoiser_ema.safetensors", "trainer_state.json", "manifest.json"]


@pytest.mark.parametrize("rel", FILES)
def test_truncated_file_is_reported_as_corrupt(full, tmp_path, rel):
    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    ckpt = run / "checkpoint-00000003"
    truncate(ckpt / rel)
    with pytest.raises(ValueError, match=rf"(?s)checkpoint {ckpt} is corrupt: {rel}.*(truncated|corrupt)") as e:
        RF.train(rf_cfg(run, resume_from_checkpoint=str(ckpt), **{**KW, "max_train_steps": 4}))
    assert "does not match" not in str(e.value)
    assert "checkpoint-00000002" in str(e.value)  # names the readable ones to use instead


def test_missing_file_is_reported_as_corrupt(full, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    ckpt = run / "checkpoint-00000003"
    (ckpt / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match=r"is corrupt: optimizer\.bin is missing"):
        C.load_checkpoint(None, ckpt)


def test_latest_falls_back_to_the_newest_readable_checkpoint(full, tmp_path, capsys):
    """optimizer.bin of step 3 truncated: `latest` resumes from step 2 (saying so) and continues exactly as the
    uninterrupted run did."""
    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    truncate(run / "checkpoint-00000003" / "optimizer.bin")
    res = RF.train(rf_cfg(run, resume_from_checkpoint="latest", **KW))
    out = capsys.readouterr().out
    assert "checkpoint-00000003 is corrupt: optimizer.bin" in out and "falling back to" in out and \
        "checkpoint-00000002" in out
    assert res["losses"] == full[1][2:]


def test_legacy_checkpoint_truncated_optimizer_is_corrupt_not_mismatch(full, tmp_path):
    """Without a manifest (older checkpoints) the file formats are still checked: a torch zip cut short."""
    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    ckpt = run / "checkpoint-00000003"
    (ckpt / "manifest.json").unlink()
    truncate(ckpt / "optimizer.bin", 0.9)
    with pytest.raises(ValueError, match=r"is corrupt: optimizer\.bin .*truncated or damaged"):
        C.check_checkpoint(ckpt)


def test_no_readable_checkpoint_is_an_error(full, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    for _, p in C.list_checkpoints(run):
        truncate(p / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)no readable checkpoint under .*checkpoint-00000003 is corrupt.*"
                                         r"checkpoint-00000001 is corrupt"):
        C.resolve_checkpoint("latest", run)


def test_manifest_lists_every_file_with_its_size(full):
    ckpt = full[0] / "checkpoint-00000003"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    assert files == {k: v for k, v in on_disk.items() if k not in ("manifest.json", "trainer_state.json")}
