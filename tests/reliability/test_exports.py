"""Atomic exports (diffusion.training.export): a model directory a trainer exports (train_t2i's vae/ and pipeline/, the RF
text_encoder/ and transformer_ema/, the final ControlNet) is complete or absent after a kill at any moment, and a
resumed run goes on; the metrics log has no repeated steps after a resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import controlnet.training as CT
from diffusion.training.export import atomic_dir, open_metrics, recover_export, save_into, save_pretrained_atomic

from .common import RF, T2I, cn_cfg, rf_cfg, t2i_cfg

REPO = Path(__file__).resolve().parents[2]


class Writer:
    """A save_pretrained that writes config.json, then fails (or not) before its weights."""

    def __init__(self, fail: bool):
        self.fail = fail

    def save_pretrained(self, d, **kw):
        Path(d, "config.json").write_text('{"new": 1}')
        if self.fail:
            raise OSError("disk full")
        Path(d, "weights.safetensors").write_bytes(b"new")


def test_atomic_dir_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "vae"
    save_pretrained_atomic(Writer(False), target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.safetensors"]
    Path(target, "config.json").write_text('{"old": 1}')
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(Writer(True), target)
    assert json.loads((target / "config.json").read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temp dir left by an error
    (tmp_path / ".tmp-vae").mkdir()  # left by a kill: removed by the next export of the same name
    (tmp_path / ".tmp-vae" / "config.json").write_text("")
    save_pretrained_atomic(Writer(False), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    assert json.loads((target / "config.json").read_text()) == {"new": 1}


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    old = tmp_path / ".old-vae"
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert recover_export(tmp_path / "vae").is_dir() and (tmp_path / "vae" / "config.json").is_file()
    with atomic_dir(tmp_path / "pipe") as tmp:
        assert tmp.name == ".tmp-pipe" and not (tmp_path / "pipe").exists()
        (tmp / "a").write_text("x")
    assert (tmp_path / "pipe" / "a").read_text() == "x"


def test_save_into_renames_config_last(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-00000001").mkdir()
    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), real(a, b)))
    save_into(run, Writer(False).save_pretrained)
    assert [n for n in moved if n in ("config.json", "weights.safetensors")] == ["weights.safetensors", "config.json"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-00000001", "config.json", "weights.safetensors"]
    with pytest.raises(OSError, match="disk full"):  # a failed export leaves the previous one as it was
        save_into(run, Writer(True).save_pretrained)
    assert (run / "weights.safetensors").read_bytes() == b"new" and not (run / ".export").exists()


KILL_AT_WEIGHTS = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {scripts!r}]
import torch
torch.set_num_threads(1)
import safetensors.torch
real = safetensors.torch.save_file
def die(tensors, filename, *a, **k):  # the weights file of the vae/ export: config.json is already on disk
    if ".tmp-vae" not in str(filename):  # the VAE phase's checkpoints are written as usual
        return real(tensors, filename, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = die
from controlnet import t2i_training as T2I
T2I.train(T2I.TrainT2IConfig(**{cfg!r}))
"""


def test_t2i_kill_during_the_vae_export_then_resume(tmp_path):
    """SIGKILL while train_t2i writes vae/ (config.json written, weights not): vae/ is absent, not half-written,
    and the next run resumes the VAE phase from its last checkpoint (output_dir/vae_phase), exports it and finishes."""
    out = tmp_path / "run"
    cfg = t2i_cfg(out, max_train_steps=1)
    kw = {k: getattr(cfg, k) for k in ("output_dir", "train_data_dir", "resolution", "block_out_channels",
                                       "down_block_types", "attention_heads", "norm_num_groups", "text_hidden_size",
                                       "text_layers", "max_length", "vae_block_out_channels", "vae_steps",
                                       "vae_batch_size", "train_batch_size", "max_train_steps", "lr_warmup_steps",
                                       "validation_steps", "validation_inference_steps", "validation_prompt", "report_to",
                                       "progress_bar")}
    code = KILL_AT_WEIGHTS.format(repo=str(REPO), scripts=str(REPO / "scripts"), cfg=kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "vae" / "config.json").exists()  # before: a config.json without weights blocked every resume
    r = T2I.train(t2i_cfg(out, max_train_steps=1, resume_from_checkpoint="latest"))
    assert r["step"] == 1 and r["vae_psnr"] is not None
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------- metrics.jsonl
def test_open_metrics_drops_steps_past_the_resume_point_and_torn_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"phase": "vae"}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with open_metrics(f, 2) as m:
        m.write('{"step": 3, "new": true}\n')
    assert [json.loads(x) for x in f.read_text().splitlines()] == [{"phase": "vae"}, {"step": 1}, {"step": 2},
                                                                  {"step": 3, "new": True}]


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("trainer", ["cn", "rf", "t2i"])
def test_metrics_have_no_repeated_steps_after_resume(tmp_path, trainer):
    """A run saved at steps 2 and 3 is resumed from checkpoint 2: steps 3.. are logged once, by the resumed run."""
    out = tmp_path / "run"
    if trainer == "cn":
        make = lambda **kw: cn_cfg(out, checkpointing_steps=2, **kw)  # noqa: E731
        root, train, key = out, CT.train, "max_train_steps"
    elif trainer == "rf":
        make = lambda **kw: rf_cfg(out, checkpointing_steps=2, **kw)  # noqa: E731
        root, train, key = out, RF.train, "max_train_steps"
    else:
        make = lambda **kw: t2i_cfg(out, checkpointing_steps=2, **kw)  # noqa: E731
        root, train, key = out, T2I.train, "max_train_steps"
    train(make(**{key: 3}))
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    train(make(**{key: 4}, resume_from_checkpoint=str(root / "checkpoint-00000002")))
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
