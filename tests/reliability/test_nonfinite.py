"""NaN/Inf guard (diffusion.training.guards) in both trainers: --on_nonfinite stop (default) raises NonFiniteError naming the
step before the update, keeping the last good checkpoint; --on_nonfinite skip drops that update and goes on."""
from __future__ import annotations

import json
import math

import pytest
import torch

import controlnet.training as CT
from diffusion.training.checkpoint import list_checkpoints, resolve_checkpoint
from diffusion.training.guards import NonFiniteError, NonFiniteGuard, grad_norm

from .common import RF, assert_state_equal, checkpoint_state, cn_cfg, rf_cfg, snapshot


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def corrupt(loss_fn, at: int, kind: str):
    """loss_fn, except that call number `at` (1-based micro-batch) returns a NaN loss or a NaN gradient."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        loss = loss_fn(*args, **kwargs)
        if calls[0] != at:
            return loss
        return loss * float("nan") if kind == "loss" else _NaNGrad.apply(loss)
    return wrapped


@pytest.mark.parametrize("loss, norm, ok", [(1.0, 2.0, True), (1.0, None, True), (float("nan"), 2.0, False),
                                            (float("inf"), 2.0, False), (1.0, float("nan"), False),
                                            (1.0, float("inf"), False), (-float("inf"), None, False)])
def test_guard_table(loss, norm, ok):
    assert NonFiniteGuard("skip").check(7, loss, norm) is ok
    if ok:
        assert NonFiniteGuard("stop").check(7, loss, norm)
        return
    with pytest.raises(NonFiniteError, match=r"non-finite .* at step 7: training stopped before the update; the last "
                                             r"good checkpoint is ck.*--on_nonfinite skip") as e:
        NonFiniteGuard("stop").check(7, loss, norm, last_checkpoint="ck")
    assert e.value.step == 7
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        NonFiniteGuard("ignore")


def test_grad_norm():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert grad_norm([a, b]) == 5.0
    b.grad[0] = float("inf")
    assert math.isinf(grad_norm([a, b]))


# ----------------------------------------------------------------------------------------------- RF trainer
def test_rf_stop_keeps_last_good_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch):
    """A NaN gradient at step 3 stops the run before the update; the step-2 checkpoint is untouched, and resuming
    (data fixed) ends bitwise where a run that never failed ends."""
    kw = dict(max_train_steps=5, checkpointing_steps=2, ema_decay=0.9)
    ref = RF.train(rf_cfg(tmp_path / "ref", **kw))
    healthy = RF.DiffusionLoss
    monkeypatch.setattr(RF, "DiffusionLoss", lambda *a, **k: corrupt(healthy(*a, **k), at=3, kind="grad"))
    with pytest.raises(NonFiniteError, match=r"gradient norm nan at step 3.*checkpoint-00000002") as e:
        RF.train(rf_cfg(tmp_path / "run", **kw))
    assert e.value.step == 3
    ckpts = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert_state_equal(checkpoint_state(ckpts / "checkpoint-00000002"),
                       checkpoint_state(tmp_path / "ref" / "checkpoint-00000002"))
    monkeypatch.setattr(RF, "DiffusionLoss", healthy)
    resumed = RF.train(rf_cfg(tmp_path / "run", resume_from_checkpoint="latest", **kw))
    assert resumed["losses"] == ref["losses"][2:]
    assert_state_equal(checkpoint_state(ckpts / "checkpoint-00000005"),
                       checkpoint_state(tmp_path / "ref" / "checkpoint-00000005"))


def test_rf_skip_drops_the_update(tmp_path, monkeypatch):
    healthy = RF.DiffusionLoss
    monkeypatch.setattr(RF, "DiffusionLoss", lambda *a, **k: corrupt(healthy(*a, **k), at=3, kind="loss"))
    r = RF.train(rf_cfg(tmp_path / "run", max_train_steps=4, checkpointing_steps=1, on_nonfinite="skip"))
    assert r["step"] == 4 and math.isnan(r["losses"][2])
    assert all(math.isfinite(x) for x in r["losses"][:2] + r["losses"][3:])
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", False) for x in rec] == [False, False, True, False] and rec[2]["loss"] is None
    c = {s: checkpoint_state(p) for s, p in list_checkpoints(tmp_path / "run")}
    for f in ("model.safetensors", "optimizer.bin", "ema_state.safetensors"):  # weights, AdamW, EMA unchanged
        assert_state_equal(c[2][f], c[3][f], f)
    assert c[3]["ema_state.safetensors"]["num_updates"] == 2 and c[4]["ema_state.safetensors"]["num_updates"] == 3
    assert any(not v.equal(c[3]["model.safetensors"][k]) for k, v in c[4]["model.safetensors"].items())
    assert all(torch.isfinite(v).all() for v in c[4]["model.safetensors"].values())


# ----------------------------------------------------------------------------------------------- ControlNet trainer
def test_controlnet_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(CT, "denoising_loss", corrupt(CT.denoising_loss, at=2, kind="loss"))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"loss nan .*at step 2.*checkpoint-00000001") as e:
        CT.train(cn_cfg(out, max_train_steps=3, checkpointing_steps=1))
    assert e.value.step == 2 and resolve_checkpoint("latest", out).name == "checkpoint-00000001"
    before = snapshot(out / "checkpoint-00000001")
    state = checkpoint_state(out / "checkpoint-00000001")
    assert all(torch.isfinite(v).all() for v in state["controlnet/diffusion_pytorch_model.safetensors"].values())
    assert not (out / "diffusion_pytorch_model.safetensors").exists()  # no final model from a failed run
    assert snapshot(out / "checkpoint-00000001") == before


def test_controlnet_skip_drops_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr(CT, "denoising_loss", corrupt(CT.denoising_loss, at=2, kind="grad"))
    out = tmp_path / "run"
    r = CT.train(cn_cfg(out, max_train_steps=3, checkpointing_steps=1, on_nonfinite="skip"))
    assert r["step"] == 3 and all(math.isfinite(x) for x in r["losses"])  # the loss was finite, its gradient not
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", False) for x in rec] == [False, True, False]
    c = {s: checkpoint_state(p) for s, p in list_checkpoints(out)}
    for f in ("model.safetensors", "optimizer.bin"):
        assert_state_equal(c[1][f], c[2][f], f)
    assert any(not v.equal(c[2]["model.safetensors"][k]) for k, v in c[3]["model.safetensors"].items())


# ----------------------------------------------------------------------------------------------- fp16 loss scaling
def test_scaler_skipped_steps_leave_lr_schedule_and_ema_alone(tmp_path, monkeypatch):
    """An update the fp16 GradScaler drops (overflow) is no update: the LR schedule does not advance, the EMA does
    not move, and metrics.jsonl marks the step (strict JSON, no Infinity) - as accelerate's scheduler does for
    diffusers' scripts. Simulated: the optimizer reports its first two steps skipped."""
    from accelerate.optimizer import AcceleratedOptimizer

    calls = [0]

    def skipped(self):
        return calls[0] <= 2

    real_step = AcceleratedOptimizer.step

    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] > 2:
            return real_step(self, *a, **k)

    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(skipped))
    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    from diffusion.training.ema import EMA

    ema_updates, real_update = [], EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, m: (ema_updates.append(1), real_update(self, m)))
    kw = dict(max_train_steps=5, lr_scheduler="linear", lr_warmup_steps=0, use_ema=True, ema_decay=0.5)
    RF.train(rf_cfg(tmp_path / "run", **kw))
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("scaler_skipped", False) for r in recs] == [True, True, False, False, False]
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == lrs[1] == lrs[2] > lrs[3] > lrs[4]  # the schedule starts at the first real update
    assert len(ema_updates) == 3
