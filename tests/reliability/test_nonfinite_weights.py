"""Non-finite weights from a finite update (adam eps 0, an infinite learning rate, an injected blow-up) in all three
trainers: the run stops in both --on_nonfinite modes naming the step and a last good checkpoint that is finite; no
checkpoint or export ever holds NaN/Inf. Also train_t2i's loss / gradient guard in its VAE and UNet phases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import controlnet.training as CT
from diffusion.training.checkpoint import list_checkpoints
from diffusion.training.guards import NonFiniteError, NonFiniteGuard, refuse_nonfinite

from .common import RF, T2I, assert_state_equal, checkpoint_state, cn_cfg, rf_cfg, t2i_cfg
from .test_nonfinite import corrupt

INF = float("inf")


def poison_adam(monkeypatch, at: int):
    """torch.optim.AdamW.step, except that call number `at` (counted over every AdamW) leaves a NaN weight."""
    real, calls = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def run(trainer: str, out: Path, mode: str, unchecked: dict, **kw):
    """One tiny run; `unchecked` is set after the config's validation (which now rejects those values)."""
    if trainer == "cn":
        cfg = cn_cfg(out, on_nonfinite=mode, max_train_steps=3, **kw)
    elif trainer == "rf":
        cfg = rf_cfg(out, on_nonfinite=mode, max_train_steps=3, **kw)
    else:
        cfg = t2i_cfg(out, on_nonfinite=mode, **kw)
    for k, v in unchecked.items():
        setattr(cfg, k, v)
    return {"cn": CT.train, "rf": RF.train, "t2i": T2I.train}[trainer](cfg)


def ckpt_root(trainer: str, out: Path) -> Path:
    return out if trainer == "cn" else out


def weights_files(root: Path) -> list[Path]:
    return [p for p in sorted(Path(root).rglob("*.safetensors")) if "optimizer" not in p.name]


def assert_all_finite(files) -> None:
    for f in files:
        bad = [k for k, v in load_file(str(f)).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{f} holds non-finite {bad[:3]}"


# (trainer, on_nonfinite, values set past validation, AdamW call to poison, failing step, extra config)
CASES = [
    ("cn", "stop", dict(adam_epsilon=0.0), None, 1, {}),
    ("cn", "skip", dict(adam_epsilon=0.0), None, 1, {}),
    ("cn", "stop", dict(learning_rate=INF), None, 1, {}),
    ("cn", "skip", {}, 3, 3, dict(checkpointing_steps=1, checkpoints_total_limit=1)),
    ("rf", "stop", dict(adam_epsilon=0.0), None, 1, {}),
    ("rf", "skip", dict(learning_rate=INF), None, 1, {}),
    ("rf", "skip", {}, 3, 3, dict(checkpointing_steps=1, checkpoints_total_limit=1)),
    ("t2i", "skip", {}, 1, 1, {}),  # VAE phase: its first AdamW step
    ("t2i", "stop", dict(learning_rate=INF), None, 1, {}),
    ("t2i", "skip", {}, 2 + 3, 3, dict(checkpointing_steps=1, checkpoints_total_limit=1)),  # 2 VAE steps first
]


@pytest.mark.parametrize("trainer, mode, unchecked, poison, fail_step, kw", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2]) or 'poisoned'}" for c in CASES])
def test_nonfinite_weights_stop_with_a_finite_last_checkpoint(tmp_path, monkeypatch, trainer, mode, unchecked, poison,
                                                              fail_step, kw):
    if poison:
        poison_adam(monkeypatch, poison)
    out = tmp_path / "run"
    phase = "VAE step" if (trainer, poison) == ("t2i", 1) else "step"
    with pytest.raises(NonFiniteError, match=rf"non-finite weights after the update of {phase} {fail_step} ") as e:
        run(trainer, out, mode, unchecked, **kw)
    assert e.value.step == fail_step
    ckpts = list_checkpoints(ckpt_root(trainer, out))
    assert [s for s, _ in ckpts] == list(range(1, fail_step))[-1:]  # pruning kept the good one
    if ckpts:
        assert str(ckpts[-1][1]) in str(e.value)  # the named checkpoint is the last one, and it is finite
    else:
        assert "no checkpoint was saved yet" in str(e.value)
    assert_all_finite(weights_files(out))
    for state in (checkpoint_state(p) for _, p in ckpts):
        assert all(torch.isfinite(v).all() for v in state["model.safetensors"].values())
    assert not (out / "diffusion_pytorch_model.safetensors").exists() and not (out / "pipeline").exists()
    if phase == "VAE step":
        assert not (out / "vae").exists()


@pytest.mark.parametrize("trainer", ["cn", "rf", "t2i"])
def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path, monkeypatch, trainer):
    """Second line of defence: were the per-step check ever bypassed, the save itself refuses NaN weights."""
    monkeypatch.setattr(NonFiniteGuard, "check_weights", lambda *a, **k: None)
    poison_adam(monkeypatch, 2 + 2 if trainer == "t2i" else 2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"refusing to write .*checkpoint-00000002.*NaN/Inf"):
        run(trainer, out, "stop", {}, checkpointing_steps=1)
    assert [s for s, _ in list_checkpoints(ckpt_root(trainer, out))] == [1]
    assert_all_finite(weights_files(out))


def test_refuse_nonfinite_table():
    refuse_nonfinite([torch.ones(3), torch.full((2,), 3e38)], "x")  # large but finite: fine
    for bad in (float("nan"), INF, -INF):
        with pytest.raises(NonFiniteError, match="refusing to write x: the weights hold NaN/Inf"):
            refuse_nonfinite([torch.ones(3), torch.tensor([1.0, bad], dtype=torch.bfloat16)], "x")


# ----------------------------------------------------------------------------------------------- t2i loss guard
def test_t2i_unet_nan_loss_stops_before_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr(T2I, "denoising_loss", corrupt(T2I.denoising_loss, at=2, kind="loss"))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan (and gradient norm nan )?at step 2: .*checkpoint-00000001") as e:
        T2I.train(t2i_cfg(out, checkpointing_steps=1))
    assert e.value.step == 2 and [s for s, _ in list_checkpoints(out)] == [1]
    assert not (out / "pipeline").exists()
    assert_all_finite(weights_files(out))


def test_t2i_unet_nan_gradient_skip_drops_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr(T2I, "denoising_loss", corrupt(T2I.denoising_loss, at=2, kind="grad"))
    out = tmp_path / "run"
    r = T2I.train(t2i_cfg(out, checkpointing_steps=1, on_nonfinite="skip", lr_scheduler="constant"))
    assert r["step"] == 3
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert [x.get("skipped", False) for x in rec if "loss" in x] == [False, True, False]
    c = {s: checkpoint_state(p) for s, p in list_checkpoints(out)}
    for f in ("model.safetensors", "optimizer.bin", "ema_state.safetensors"):  # weights, AdamW, EMA unchanged
        assert_state_equal(c[1][f], c[2][f], f)
    assert_all_finite(weights_files(out))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_t2i_vae_phase_has_the_guard(tmp_path, monkeypatch, mode):
    from controlnet import t2i_vae  # the VAE phase lives there

    monkeypatch.setattr(t2i_vae, "gradient_difference", corrupt(T2I.gradient_difference, at=2, kind="loss"))
    out = tmp_path / "run"
    cfg = t2i_cfg(out, vae_gdl_weight=0.1, vae_steps=3, on_nonfinite=mode, max_train_steps=1)
    if mode == "stop":
        with pytest.raises(NonFiniteError, match=r"non-finite loss nan (and gradient norm nan )?at VAE step 2: .*no checkpoint"):
            T2I.train(cfg)
        assert not (out / "vae").exists()
        return
    r = T2I.train(cfg)
    assert r["step"] == 1 and math.isfinite(r["vae_psnr"])
    assert_all_finite(weights_files(out))
    vae = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert vae["phase"] == "vae" and vae["skipped_steps"] == [2]
