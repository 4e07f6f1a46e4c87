"""The text-to-image task (scripts/train_t2i.py): short real runs on a tiny fixture (loadable pipeline, exact resume, learning, config errors)."""
import json

import numpy as np
import pytest
import torch

from controlnet.pipeline import ControlNetPipeline
from diffusion import Discrete, schedule_from_diffusers
from diffusion.training.config import ConfigError, parse_config
from diffusion.losses import DiffusionLoss

from .sd_fixtures import fill_data

from controlnet import t2i_training as t2i  # noqa: E402  (scripts/train_t2i.py is its command line)

PROMPT = "red circle with blue background"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_cfg(out, **kw) -> t2i.TrainT2IConfig:
    base = dict(output_dir=str(out), train_data_dir=str(fill_data(32, 16)), resolution=16, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_heads=2, norm_num_groups=4,
                text_hidden_size=16, text_layers=1, max_length=8, vae_block_out_channels=(8, 8), vae_steps=3,
                vae_batch_size=4, train_batch_size=8, max_train_steps=3, lr_warmup_steps=0, checkpointing_steps=2,
                validation_steps=0, validation_inference_steps=2, validation_prompt=[PROMPT], report_to="none", progress_bar=False,
                num_threads=None)
    return t2i.TrainT2IConfig(**{**base, **kw})


def test_train_writes_a_loadable_diffusers_pipeline(tmp_path):
    res = t2i.train(tiny_cfg(tmp_path / "run"))
    pipe_dir = res["pipeline"]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (pipe_dir / sub).is_dir()
    assert (pipe_dir / "tokenizer" / "vocab.json").is_file() and (pipe_dir / "tokenizer" / "merges.txt").is_file()
    assert not list(pipe_dir.rglob("*.bin"))  # safetensors only
    sched = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["beta_schedule"] == "linear"
    assert isinstance(schedule_from_diffusers(pipe_dir), Discrete)
    # checkpoints: every 2 steps and at the end; samples grid at the end; metrics one line per step (+ vae, done)
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-00000002", "checkpoint-00000003"]
    assert (tmp_path / "run" / "validation" / "step-3.png").is_file()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert lines[0]["phase"] == "vae" and lines[-1]["phase"] == "done"

    # the real diffusers loader reads it, and our pipeline samples from it (EMA UNet)
    from diffusers import StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    assert sd.unet.config.in_channels == 4 and sd.vae_scale_factor == 2
    pipe = ControlNetPipeline.from_pretrained(pipe_dir)
    imgs = pipe(PROMPT, steps=2, guidance_scale=2.0, seed=0, output_type="np").images
    assert imgs.shape == (1, 16, 16, 3) and np.isfinite(imgs).all()
    ema = res["ema"].state_dict()
    saved = pipe.unet.state_dict()
    assert all(torch.equal(ema[k], saved[k]) for k in saved)


def test_resume_continues_exactly(tmp_path):
    kw = dict(lr_scheduler="constant")  # the LR curve then does not depend on max_train_steps
    full = t2i.train(tiny_cfg(tmp_path / "a", max_train_steps=4, **kw))
    t2i.train(tiny_cfg(tmp_path / "b", max_train_steps=2, **kw))  # an interrupted run
    resumed = t2i.train(tiny_cfg(tmp_path / "b", max_train_steps=4, resume_from_checkpoint="latest", **kw))
    assert resumed["step"] == 4 and len(resumed["losses"]) == 2
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6, abs=1e-7)
    a, b = full["ema"].state_dict(), resumed["ema"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_interrupted_vae_phase_resumes_exactly(tmp_path, monkeypatch):
    """The VAE phase runs on the shared loop: killed after its checkpoint at VAE step 2, a fresh start is refused
    and --resume_from_checkpoint latest continues it to the same VAE (bit-exact), then the same pipeline."""
    from safetensors.torch import load_file

    from controlnet.t2i_vae import VAETask
    from diffusion.training.checkpoint import RunError

    kw = dict(vae_steps=4, max_train_steps=1, checkpointing_steps=2)
    t2i.train(tiny_cfg(tmp_path / "a", **kw))
    real, calls = VAETask.loss, [0]

    def dies_in_step_4(self, *args):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(VAETask, "loss", dies_in_step_4)
    run = tmp_path / "b"
    with pytest.raises(RuntimeError, match="killed"):
        t2i.train(tiny_cfg(run, **kw))
    monkeypatch.undo()
    assert not (run / "vae").exists() and not (run / "pipeline").exists()
    assert [p.name for p in (run / "vae_phase").glob("checkpoint-*")] == ["checkpoint-00000002"]
    with pytest.raises(RunError, match="resume_from_checkpoint latest"):
        t2i.train(tiny_cfg(run, **kw))
    resumed = t2i.train(tiny_cfg(run, resume_from_checkpoint="latest", **kw))
    assert resumed["step"] == 1 and resumed["vae_psnr"] is not None
    steps = [json.loads(s)["step"] for s in (run / "vae_phase" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for part in ("vae", "pipeline/vae", "pipeline/unet"):
        a = load_file(tmp_path / "a" / part / "diffusion_pytorch_model.safetensors")
        b = load_file(run / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert json.loads((run / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((tmp_path / "a" / "vae" / "config.json").read_text())["scaling_factor"]


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    cfg = tiny_cfg(tmp_path)
    images, texts = t2i.load_images(cfg)
    torch.manual_seed(0)
    vae = t2i.build_vae(cfg).eval()
    mean, std = t2i.encode_all(vae, images[:8])
    tokenizer, text_encoder = t2i.build_text_encoder(cfg, tmp_path / "tok")
    unet = t2i.build_unet(cfg, mean.shape[-1])
    sched = t2i.scheduler_config(cfg)
    loss_fn = DiffusionLoss(schedule_from_diffusers(sched), "v", "uniform", time_input="timestep")

    def text_fn(tx):
        with torch.no_grad():
            return t2i.encode_text(tokenizer, text_encoder, tx)

    def fixed_loss():  # same timesteps, noise and posterior sample every time
        with torch.no_grad():
            return t2i.denoising_loss(loss_fn, unet, text_fn, mean, std, texts[:8], torch.Generator().manual_seed(1)).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for i in range(40):
        loss = t2i.denoising_loss(loss_fn, unet, text_fn, mean, std, texts[:8], torch.Generator().manual_seed(100 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before


@pytest.mark.parametrize("kw, msg", [
    (dict(rescale_betas_zero_snr=True, prediction_type="epsilon"), "needs prediction_type=v_prediction"),
    (dict(resolution=18), "must be divisible"),
    (dict(sampler="nope"), "unknown sampler"),
    (dict(block_out_channels=(8, 16, 16)), "one entry per down block"),
])
def test_config_errors_name_the_fix(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_cfg(tmp_path, **kw)


def test_cli_overrides_and_dry_run(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(t2i.TrainT2IConfig, ["--max_train_steps=7", "--block_out_channels", "16,32", "--down_block_types",
                                          "DownBlock2D,CrossAttnDownBlock2D", "--dry-run"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "max_train_steps: 7" in out and "block_out_channels: [16, 32]" in out
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_config(t2i.TrainT2IConfig, ["--max_trian_steps=7"], exit_on_error=False)


def test_trained_text_encoder_is_saved(tmp_path):
    res = t2i.train(tiny_cfg(tmp_path / "run", train_text_encoder=True, max_train_steps=2, ema_decay=0.0))
    torch.manual_seed(0)  # train() seeds the same way: these are the initial weights
    tok, init = t2i.build_text_encoder(tiny_cfg(tmp_path / "x"), tmp_path / "tok")
    from transformers import CLIPTextModel
    saved = CLIPTextModel.from_pretrained(res["pipeline"] / "text_encoder").state_dict()
    ema = res["ema"]["text_encoder"].state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    init = init.state_dict()
    changed = [k for k, v in init.items() if not torch.equal(v, saved[k])]
    assert any(k.endswith("token_embedding.weight") for k in changed) and len(changed) > len(init) // 2


def test_random_crops_are_windows_of_each_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    c = t2i.random_crops(x, 4, g)
    assert c.shape == (2, 3, 4, 4)
    for img, crop in zip(x, c):
        y0, x0 = divmod(int(crop[0, 0, 0] - img[0, 0, 0]), 8)
        assert torch.equal(crop, img[:, y0:y0 + 4, x0:x0 + 4])
    assert t2i.random_crops(x, None, g) is x and t2i.random_crops(x, 8, g) is x
