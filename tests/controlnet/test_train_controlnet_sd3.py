"""SD3 ControlNet training (controlnet.training_sd3) on the tiny SD3 fixture: the objective against diffusers' own
formulas, a short run that learns and whose outputs load in diffusers and drive the pipelines, exact resume, a
2-process gloo launch, preflight errors and --help."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from controlnet.cli import main as cn_sample
from controlnet.data import collate
from controlnet.pipeline_sd3 import SD3ControlNetPipeline
from controlnet.training import TrainControlNetConfig, build_dataset
from controlnet.training_sd3 import SD3ControlNetTask, residual_targets, sd3_loss_weights, sd3_training_times
from diffusion import RectifiedFlow
from diffusion.losses import DiffusionLoss
from diffusion.training.checkpoint import step_generator
from diffusion.training.loop import train as run_task

from .sd_fixtures import REPO, fill_data, tiny_sd3
from .test_train_controlnet import _free_port, assert_same_weights, state

import train_controlnet as script  # noqa: E402  (scripts/ is on sys.path via sd_fixtures)

PROMPT = "red circle with blue background"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def make_cfg(out, **kw) -> TrainControlNetConfig:
    base = dict(pretrained_model_name_or_path=str(tiny_sd3()), train_data_dir=str(fill_data()), output_dir=str(out),
                resolution=32, train_batch_size=4, learning_rate=1e-3, lr_warmup_steps=0, report_to="none",
                logging_steps=1000, checkpointing_steps=1000, progress_bar=False)
    return TrainControlNetConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- objective
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_times_and_loss_match_diffusers_formulas(scheme):
    """t = the scheduler's training sigma at index floor(u N) (train_controlnet_sd3.py); the loss equals diffusers'
    weighted x0 regression (precondition_outputs 1) and velocity regression (0) on the same tensors."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.rand(64, generator=g), torch.tensor([0.0, 0.9995, 1.0 - 1e-7])])
    index = (u * 1000).long()
    t = sd3_training_times(u, 3.0)
    torch.testing.assert_close(t.float(), sched.sigmas[index], rtol=0, atol=1e-6)
    torch.testing.assert_close((1000 * t).float(), sched.timesteps[index], rtol=0, atol=1e-3)

    x0, eps, v = (torch.randn(len(t), 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s = t.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    w = compute_loss_weighting_for_sd3(scheme, sigmas=s).double()
    ours = DiffusionLoss(RectifiedFlow(3.0), "velocity")(lambda x, ts: v, x0, t=t, eps=eps, reduction="none")
    for precondition in (1, 0):
        pred, target = (x_t - s * v, x0) if precondition else (v, eps - x0)
        theirs = (w * (pred - target) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(ours * sd3_loss_weights(scheme, t, precondition), theirs, rtol=1e-5, atol=0)


def test_residual_targets_follow_diffusers_transformer():
    """Residual k goes to blocks with int(i / (L / K)) == k; the last (context-pre-only) block takes none."""
    assert residual_targets(24, 12) == [i // 2 for i in range(23)]  # SD3-medium: the diffusers default
    assert residual_targets(2, 1) == [0]
    assert set(residual_targets(2, 2)) == {0}  # residual 1 would reach no block: refused by preflight


@pytest.mark.parametrize("kw, message", [
    (dict(controlnet_num_layers=2), "context-pre-only"),
    (dict(num_extra_conditioning_channels=1), "pass 0"),
    (dict(resolution=40), "multiple of 16"),
    (dict(weighting_scheme="mode", mode_scale=3.0), "mode_scale"),
    (dict(crops_coords_top_left_h=8), "SDXL only"),
])
def test_preflight_refuses_bad_sd3_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        SD3ControlNetTask(make_cfg(tmp_path / "x", **kw)).preflight()
    assert not (tmp_path / "x").exists()


def test_sd3_flags_refused_for_an_sd_base(tmp_path):
    from controlnet.training import ControlNetTask

    from .sd_fixtures import tiny_sd

    cfg = make_cfg(tmp_path / "x", pretrained_model_name_or_path=str(tiny_sd()), weighting_scheme="mode",
                   upcast_vae=True)
    with pytest.raises(ValueError, match="--weighting_scheme, --upcast_vae: SD3 only"):
        ControlNetTask(cfg).preflight()


# ----------------------------------------------------------------------------------------------- runs
def test_short_run_learns_and_outputs_load_in_diffusers(tmp_path):
    from diffusers import SD3ControlNetModel

    out = tmp_path / "run"
    task = SD3ControlNetTask(make_cfg(out, max_train_steps=24, learning_rate=3e-3, use_ema=True, ema_decay=0.5,
                                      validation_steps=24, validation_prompt=[PROMPT], num_validation_images=1,
                                      validation_inference_steps=2, sampler="flow_euler"))
    res = run_task(task)
    cn, ema, pipe = res["controlnet"].eval(), res["ema"], res["pipeline"]
    assert res["step"] == 24 and (out / "validation" / "step-24.png").is_file()
    assert not any(p.requires_grad for p in pipe.transformer.parameters())

    # the untrained ControlNet (zero-initialised: the base exactly) vs the trained one on a fixed batch and noise
    torch.manual_seed(0)
    fresh = SD3ControlNetModel.from_transformer(pipe.transformer, num_layers=1, num_extra_conditioning_channels=0)
    batch = collate([build_dataset(task.cfg)[i] for i in range(16)])
    with torch.no_grad():
        before, after = (np.mean([task.loss(net, batch, step_generator(123, k)).item() for k in range(3)])
                         for net in (fresh.eval(), cn))
    # a random base bounds what a ControlNet can fix (its output passes the base's last block and LayerNorm): measured
    # 5.80 -> 5.70 after 20 steps, 5.64 after 30
    assert after < 0.985 * before, (before, after)

    # final, EMA and checkpoint weights load in diffusers and give the trained modules' residuals exactly
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    kw = dict(hidden_states=x, controlnet_cond=cond, timestep=torch.tensor([500.0, 900.0]),
              encoder_hidden_states=torch.randn(2, 154, 64, generator=g), pooled_projections=torch.zeros(2, 40))
    last = out / "checkpoint-00000024" / "controlnet"
    for directory, module in ((out, cn), (out / "controlnet_ema", ema), (last, cn)):
        loaded = SD3ControlNetModel.from_pretrained(directory).eval()
        assert_same_weights(state(loaded), state(module))
        with torch.no_grad():
            for a, b in zip(loaded(**kw).controlnet_block_samples, module(**kw).controlnet_block_samples):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)  # same weights; BLAS paths: ~1 ulp
                assert a.abs().max() > 0
    assert json.loads((out / "config.json").read_text())["_class_name"] == "SD3ControlNetModel"

    # it drives our pipeline (changing the base's output) and cn-sample
    sd3 = SD3ControlNetPipeline.from_pretrained(tiny_sd3(), controlnet=out)
    run = dict(steps=2, height=32, width=32, seed=0, output_type="latent", sampler="flow_euler")
    cond_image = batch["conditioning_pixel_values"][:1]
    trained = sd3(PROMPT, cond_image, **run).images
    assert not torch.allclose(trained, sd3(PROMPT, cond_image, controlnet_conditioning_scale=0.0, **run).images)
    from PIL import Image
    Image.fromarray((cond_image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "c.png")
    assert cn_sample(["--condition", str(tmp_path / "c.png"), "--model", str(tiny_sd3()), "--controlnet", str(out),
                      "--steps", "2", "--height", "32", "--width", "32", "--no_progress", "--sampler", "flow_euler",
                      "--out", str(tmp_path / "samples")]) == 0


def test_resume_is_exact(tmp_path):
    """2 steps straight == 1 step + resume + 1 step, bitwise: accumulation 2, caption dropout, mode density, bf16
    base with a float32 VAE (--upcast_vae), gradient checkpointing, validation (a bf16 copy of the ControlNet)."""
    kw = dict(train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=2, checkpointing_steps=1,
              proportion_empty_prompts=0.5, weighting_scheme="mode", precondition_outputs=0, mixed_precision="bf16",
              upcast_vae=True, gradient_checkpointing=True, validation_prompt=[PROMPT], validation_steps=2,
              validation_inference_steps=2, num_validation_images=1, sampler="flow_euler")
    a = run_task(SD3ControlNetTask(make_cfg(tmp_path / "a", **kw)))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-00000001", tmp_path / "b" / "checkpoint-00000001")
    b = run_task(SD3ControlNetTask(make_cfg(tmp_path / "b", resume_from_checkpoint="latest", **kw)))
    assert b["step"] == 2 and b["losses"] == a["losses"][1:]
    assert_same_weights(state(a["controlnet"]), state(b["controlnet"]))
    assert a["pipeline"].transformer.dtype == torch.bfloat16 and a["pipeline"].vae.dtype == torch.float32
    assert a["controlnet"].dtype == torch.float32 and a["controlnet"].controlnet_blocks[0].weight.abs().max() > 0
    assert (tmp_path / "b" / "validation" / "step-2.png").is_file()


def test_two_process_gloo_launch(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo DDP): the SD3 task through the CLI."""
    from diffusers import SD3ControlNetModel

    out = tmp_path / "mp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "scripts" / "train_controlnet.py"),
           "--pretrained_model_name_or_path", str(tiny_sd3()), "--train_data_dir", str(fill_data()),
           "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2",
           "--checkpointing_steps", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
           "--weighting_scheme", "logit_normal", "--logit_mean", "0.5", "--precondition_outputs", "0",
           "--report_to", "none", "--logging_steps", "1"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("done: step 2") == 1  # main process only
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    ck = out / "checkpoint-00000002"
    assert (ck / "random_states_0.pkl").is_file() and (ck / "random_states_1.pkl").is_file()
    assert_same_weights(state(SD3ControlNetModel.from_pretrained(ck / "controlnet")),
                        state(SD3ControlNetModel.from_pretrained(out)))
    assert SD3ControlNetModel.from_pretrained(out).controlnet_blocks[0].weight.abs().max() > 0


def test_help_lists_sd3_flags(capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs",
                 "num_extra_conditioning_channels", "max_sequence_length", "upcast_vae", "controlnet_num_layers"):
        assert f"--{name} " in text, name
