"""Exact resume and reproducible training, both trainers, CPU fp32: N steps + save + resume + M steps leaves the
same complete training state as N + M uninterrupted steps (weights, EMA, AdamW moments and step counts, LR
scheduler, RNG states, trainer counters; bitwise), resuming mid-epoch with gradient accumulation groups that
straddle an epoch boundary; and two runs with one seed are bitwise equal.

Complements tests/diffusion/test_train_rf_dit.py::test_resume_is_bit_exact (weights, EMA, losses) and
tests/controlnet/test_train_controlnet.py::test_resume_is_exact_with_gradient_accumulation (weights, losses,
optimizer step count) with the full checkpoint state. The global RNG states are part of it: the trainers'
noise comes from per-micro-batch generators (diffusion.training.checkpoint.step_generator) and their DataLoaders have
their own generator, so the checkpointed global RNG (what dropout would use) evolves identically."""
from __future__ import annotations

import shutil

from controlnet.training import train as train_cn

from .common import RF, assert_state_equal, checkpoint_state, cn_cfg, fill_data, rf_cfg


def test_rf_resume_mid_epoch_with_accumulation_restores_full_state(tmp_path):
    """8x8 digits (1437 images) in batches of 256: 5 micro-batches an epoch; accumulation 2, so step 3 takes micro-
    batches 4 (epoch 0) and 5 (epoch 1), and the resume at step 3 starts mid-epoch (epoch 1, batch 1)."""
    kw = dict(train_batch_size=256, resolution=8, gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=3,
              ema_decay=0.9, lr_scheduler="cosine", cond_dropout=0.3, learning_rate=1e-3)
    full = RF.train(rf_cfg(tmp_path / "full", **kw))
    ckpts = tmp_path / "full"
    (tmp_path / "resumed").mkdir(parents=True)
    shutil.copytree(ckpts / "checkpoint-00000003", tmp_path / "resumed" / "checkpoint-00000003")
    resumed = RF.train(rf_cfg(tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed["losses"] == full["losses"][3:]

    a = checkpoint_state(ckpts / "checkpoint-00000006")
    b = checkpoint_state(tmp_path / "resumed" / "checkpoint-00000006")
    assert {"model.safetensors", "optimizer.bin", "lr_scheduler_state.safetensors", "ema_state.safetensors",
            "random_states_0.pkl", "denoiser.safetensors", "denoiser_ema.safetensors", "trainer_state.json"} <= set(a)
    assert_state_equal(a, b)
    assert a["trainer_state.json"] == {"step": 6, "micro_step": 12, "epoch": 2}
    assert a["ema_state.safetensors"]["num_updates"] == 6  # EMA: one update per optimizer step
    assert {int(s["step"]) for s in a["optimizer.bin"]["state"].values()} == {6}  # AdamW: 6 steps, not 12
    assert a["lr_scheduler_state.safetensors"]["last_epoch"] == 6  # LR scheduler
    # not vacuous: training moved the weights and the EMA between the two checkpoints
    mid = checkpoint_state(ckpts / "checkpoint-00000003")
    for f in ("model.safetensors", "denoiser_ema.safetensors"):
        assert any(not v.equal(mid[f][k]) for k, v in a[f].items())

    # same seed, fresh run: bitwise the same final state (reproducible training)
    again = RF.train(rf_cfg(tmp_path / "again", **kw))
    assert again["losses"] == full["losses"]
    assert_state_equal(a, checkpoint_state(tmp_path / "again" / "checkpoint-00000006"))


def test_controlnet_resume_mid_epoch_restores_full_state(tmp_path):
    """6 samples in batches of 2 (3 micro-batches an epoch), accumulation 2: the checkpoint at step 2 sits at
    micro-batch 4 (epoch 1, batch 1). Resumed and uninterrupted runs end with the same full state."""
    data = tmp_path / "data"
    shutil.copytree(fill_data(), data)
    lines = (data / "prompt.json").read_text().splitlines()[:6]
    (data / "prompt.json").write_text("\n".join(lines) + "\n")
    kw = dict(train_data_dir=str(data), gradient_accumulation_steps=2, max_train_steps=5, checkpointing_steps=1,
              lr_scheduler="cosine", lr_warmup_steps=2, proportion_empty_prompts=0.5)
    full = train_cn(cn_cfg(tmp_path / "full", **kw))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-00000002", tmp_path / "resumed" / "checkpoint-00000002")
    resumed = train_cn(cn_cfg(tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed["losses"] == full["losses"][2:]

    a = checkpoint_state(tmp_path / "full" / "checkpoint-00000005")
    assert {"model.safetensors", "optimizer.bin", "lr_scheduler_state.safetensors", "random_states_0.pkl",
            "controlnet/diffusion_pytorch_model.safetensors", "trainer_state.json"} <= set(a)
    assert_state_equal(a, checkpoint_state(tmp_path / "resumed" / "checkpoint-00000005"))
    assert a["trainer_state.json"] == {"step": 5, "micro_step": 10, "epoch": 3}
    assert {int(s["step"]) for s in a["optimizer.bin"]["state"].values()} == {5}
    mid = checkpoint_state(tmp_path / "full" / "checkpoint-00000002")
    assert any(not v.equal(mid["model.safetensors"][k]) for k, v in a["model.safetensors"].items())

    again = train_cn(cn_cfg(tmp_path / "again", **kw))
    assert again["losses"] == full["losses"]
    assert_state_equal(a, checkpoint_state(tmp_path / "again" / "checkpoint-00000005"))
