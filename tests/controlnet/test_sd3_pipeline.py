"""SD3 + SD3 ControlNet on the tiny fixture (scripts/make_tiny_sd3.py): diffusers layout with and without T5, parity
with diffusers' StableDiffusion3ControlNetPipeline (rectified flow, VAE-encoded conditions, pooled text, CFG, scale,
two ControlNets), seed-not-batch determinism, every sampler and grid, cn-sample end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.cli import main
from controlnet.pipeline_sd3 import SD3ControlNetPipeline
from diffusion import SAMPLERS, TIME_GRIDS, RectifiedFlow

from .sd_fixtures import (assert_cn_sample_names_corrupt_part, assert_seed_not_batch_and_scale_zero,
                          controlnet_dir, tiny_sd3)
from .tiny import randomize

PROMPTS = ["red circle with blue background", "yellow circle"]
SIZE, STEPS = 64, 5


@pytest.fixture(scope="module")
def pipe():
    return SD3ControlNetPipeline.from_pretrained(tiny_sd3(), controlnet=controlnet_dir(tiny_sd3()))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)) for _ in range(2)]


@pytest.mark.parametrize("t5", [True, False])
def test_fixture_is_a_diffusers_sd3_directory(t5):
    from diffusers import SD3ControlNetModel, StableDiffusion3Pipeline

    root = tiny_sd3(t5)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert (index["text_encoder_3"][0] is None) == (not t5)
    no_t5 = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)  # diffusers' way of dropping T5
    sd = StableDiffusion3Pipeline.from_pretrained(root, local_files_only=True, **no_t5)
    assert (sd.text_encoder_3 is None) == (not t5) and type(sd.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    v, tr = sd.vae.config, sd.transformer.config
    assert v.latent_channels == tr.in_channels == 16 and not v.use_quant_conv and v.shift_factor and v.scaling_factor
    assert tr.pooled_projection_dim == sd.text_encoder.config.projection_dim + sd.text_encoder_2.config.projection_dim
    cn = SD3ControlNetModel.from_pretrained(controlnet_dir(root))
    assert all(m.weight.abs().min() > 0 for m in [*cn.controlnet_blocks, cn.pos_embed_input.proj])  # not zero
    ours = SD3ControlNetPipeline.from_pretrained(root)
    assert isinstance(ours.schedule, RectifiedFlow) and ours.schedule.shift == 3.0
    assert (ours.prediction, ours.time_input, ours.pixel_multiple) == ("velocity", "t1000", 16)


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers draws the condition's VAE posterior noise from the global RNG, separately for the two CFG halves;
    parity is checked on the posterior mean (both pipelines call DiagonalGaussianDistribution.sample)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.mark.parametrize("case", ["t5_scale", "no_t5_two_controlnets", "zero_pooled_no_shift", "sd35_style"])
def test_parity_with_diffusers_sd3_controlnet_pipeline(posterior_mean, images, case):
    """Same weights, latents and FlowMatchEuler steps (diffusers driven with sigmas linspace(1, 1/n, n), i.e. our
    shifted grid; flow_euler here) as diffusers: text encoders (T5 or zeros), pooled text, VAE-encoded shifted and
    scaled conditions, CFG, conditioning scale, SD3MultiControlNetModel, force_zeros_for_pooled_projection and
    SD3.5-style ControlNets (no text states, the transformer's position embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    root = tiny_sd3(case.startswith("t5"))
    cn = controlnet_dir(root)
    nets = [SD3ControlNetModel.from_pretrained(cn).eval() for _ in range(1 + (case == "no_t5_two_controlnets"))]
    image, scale = images[0], 0.7
    if case == "no_t5_two_controlnets":  # a second ControlNet with other weights
        with torch.no_grad():
            for p in nets[1].parameters():
                p.mul_(-1.5)
        image, scale = images, [0.6, 1.3]
    if case == "zero_pooled_no_shift":  # InstantX SD3 ControlNets: zero pooled text, no shift of condition latents
        nets[0].register_to_config(force_zeros_for_pooled_projection=True)
    if case == "sd35_style":  # SD3.5 ControlNets: single-stream blocks without text, the transformer's pos_embed
        cfg = {k: v for k, v in nets[0].config.items() if not k.startswith("_")}
        torch.manual_seed(1)
        nets = [SD3ControlNetModel(**{**cfg, "joint_attention_dim": None, "use_pos_embed": False}).eval()]
        randomize(nets[0].pos_embed_input, seed=2), randomize(nets[0].controlnet_blocks, seed=3)
    ours = SD3ControlNetPipeline.from_pretrained(root, controlnet=nets if len(nets) > 1 else nets[0])
    theirs = StableDiffusion3ControlNetPipeline(
        transformer=ours.transformer, vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
        text_encoder_2=ours.text_encoder_2, tokenizer_2=ours.tokenizer_2, text_encoder_3=ours.text_encoder_3,
        tokenizer_3=ours.tokenizer_3, controlnet=nets if len(nets) > 1 else nets[0],
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ours.scheduler_config))
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(guidance_scale=4.0, latents=latents, height=SIZE, width=SIZE, controlnet_conditioning_scale=scale,
              max_sequence_length=12, negative_prompt=["blue", "green"] if case == "t5_scale" else None)
    output_type = "pt" if case == "t5_scale" else "latent"
    ref = theirs(PROMPTS, control_image=image, num_inference_steps=STEPS, sigmas=np.linspace(1, 1 / STEPS, STEPS),
                 output_type=output_type, **kw).images
    got = ours(PROMPTS, image, sampler="flow_euler", steps=STEPS, output_type=output_type, **kw).images
    assert ref.std() > 0.05
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    ours.controlnet = None  # the ControlNet changes the result: the parity above can fail on it
    assert (ours(PROMPTS, sampler="flow_euler", steps=STEPS, output_type=output_type, **kw).images - ref).abs().max() > 1e-2


def test_seed_not_batch_and_condition_latents(pipe, images):
    """Sample i depends on seed + i only: the prior, the condition's VAE posterior noise and a stochastic
    sampler's noise all come from its generator. Scale 0 == no ControlNet."""
    kw = dict(sampler="dpmpp_2m_sde", steps=3, guidance_scale=3.0, output_type="latent", max_sequence_length=8)
    assert_seed_not_batch_and_scale_zero(pipe, PROMPTS, images[0], **kw)
    with pytest.raises(ValueError, match="guess_mode and only_mid_control are UNet ControlNet options"):
        pipe(PROMPTS[0], images[0], guess_mode=True, **kw)


def test_every_sampler_and_grid_runs(pipe, images):
    """Every registered sampler on the SD3-shifted grid, every grid with flow_euler; the two rectified-flow misfits
    (the DDPM-table 'leading' grid, dpm_adaptive from alpha = 0) fail with the core's clear errors."""
    run = lambda **kw: pipe(PROMPTS[0], images[0], steps=2, seed=0, guidance_scale=1.0, output_type="latent",  # noqa
                            max_sequence_length=8, **kw).images
    for name in sorted(SAMPLERS):
        if name == "dpm_adaptive":
            with pytest.raises(ValueError, match="needs a start with alpha > 0"):
                run(sampler=name)
            z = run(sampler=name, timesteps=[0.95, 0.5, 0.0], rtol=0.5)
        else:
            z = run(sampler=name)
        assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all(), name
    for grid in sorted(TIME_GRIDS):
        if grid == "leading":
            with pytest.raises(ValueError, match="needs a Discrete schedule"):
                run(sampler="flow_euler", time_grid=grid)
            continue
        assert torch.isfinite(run(sampler="flow_euler", time_grid=grid)).all(), grid


def test_cn_sample_end_to_end(images, tmp_path, capsys):
    images[0].save(tmp_path / "cond.png")
    args = ["--condition", str(tmp_path / "cond.png"), "--model", str(tiny_sd3()), "--controlnet",
            str(controlnet_dir(tiny_sd3())), "--steps", "2", "--num_images", "2", "--no_progress", "--sampler",
            "flow_euler", "--conditioning_scale", "0.8"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grid.png", "sample_00.png", "sample_01.png",
                                                                  "settings.json"]
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["family"] == "sd3"
    assert np.asarray(Image.open(tmp_path / "a" / "sample_00.png")).shape == (SIZE, SIZE, 3)
    with pytest.raises(SystemExit) as e:  # SD3 latents are patchified by 2: 16-pixel steps
        main([*args, "--out", str(tmp_path / "b"), "--height", "40"])
    assert e.value.code == 2 and "multiples of 16 for SD3" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("part, msg", [
    ("transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors is truncated"),
    ("tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer.json is empty"),
    ("text_encoder_3/config.json", "text_encoder_3/config.json is empty")])
def test_cn_sample_names_a_corrupt_sd3_file(images, tmp_path, capsys, part, msg):
    assert_cn_sample_names_corrupt_part(tiny_sd3(), part, msg, images[0], tmp_path, capsys)
