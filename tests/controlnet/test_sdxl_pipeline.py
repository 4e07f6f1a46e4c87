"""SDXL + ControlNet on the tiny fixture (scripts/make_tiny_sdxl.py): diffusers layout, parity with diffusers'
StableDiffusionXLControlNetPipeline (pooled text, micro-conditioning, CFG, guess mode, scale, two ControlNets),
seed-not-batch determinism, every sampler and grid, cn-sample end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlNet
from controlnet.cli import main, run
from controlnet.pipeline_sdxl import SDXLControlNetPipeline
from diffusion import SAMPLERS, TIME_GRIDS

from .sd_fixtures import (assert_cn_sample_names_corrupt_part, assert_seed_not_batch_and_scale_zero,
                          controlnet_dir, tiny_sdxl)
from .tiny import randomize

PROMPTS = ["red circle with blue background", "yellow circle"]
SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    return SDXLControlNetPipeline.from_pretrained(tiny_sdxl(), controlnet=controlnet_dir(tiny_sdxl()))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)) for _ in range(2)]


def test_fixture_is_a_diffusers_sdxl_directory():
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    root = tiny_sdxl()
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    sd = StableDiffusionXLPipeline.from_pretrained(root, local_files_only=True)
    assert isinstance(sd.text_encoder_2, CLIPTextModelWithProjection) and sd.tokenizer_2.pad_token == "!"
    u = sd.unet.config
    assert u.addition_embed_type == "text_time"
    assert u.cross_attention_dim == sd.text_encoder.config.hidden_size + sd.text_encoder_2.config.hidden_size
    assert u.projection_class_embeddings_input_dim == 6 * u.addition_time_embed_dim + \
        sd.text_encoder_2.config.projection_dim
    assert type(sd.scheduler).__name__ == "EulerDiscreteScheduler" and sd.config.force_zeros_for_empty_prompt
    cn = ControlNetModel.from_pretrained(controlnet_dir(root))
    assert all(m.weight.abs().min() > 0 for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block])  # not zero


def _diffusers_pipe(ours, controlnets):
    from diffusers import DDIMScheduler, StableDiffusionXLControlNetPipeline

    theirs = StableDiffusionXLControlNetPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, text_encoder_2=ours.text_encoder_2, tokenizer=ours.tokenizer,
        tokenizer_2=ours.tokenizer_2, unet=ours.unet, controlnet=controlnets,
        scheduler=DDIMScheduler.from_config(ours.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False))
    theirs.set_progress_bar_config(disable=True)
    return theirs


@pytest.mark.parametrize("case", ["micro_cond_zero_negative", "guess_mode_negative_prompt", "two_controlnets"])
def test_parity_with_diffusers_sdxl_controlnet_pipeline(pipe, images, tmp_path, case):
    """Same weights, latents and DDIM (trailing, alpha_bar -> 1, 5 steps) as diffusers: both text encoders, the pooled
    projection, add_time_ids, zero negative embeddings (negative_prompt=None), CFG, conditioning scale, guess mode
    (ControlNet on the conditional half only) and a second ControlNet agree to 1e-4 on the latents (|z| ~ 50)."""
    from diffusers import ControlNetModel

    nets, theirs_nets, image, scale = pipe.controlnet, ControlNetModel.from_pretrained(controlnet_dir(tiny_sdxl())), \
        images[0], 0.7
    if case == "two_controlnets":
        randomize(ControlNet.from_unet(pipe.unet), seed=5).save_pretrained(tmp_path / "cn2")
        nets = [pipe.controlnet, ControlNet.from_pretrained(tmp_path / "cn2").eval()]
        theirs_nets = [theirs_nets, ControlNetModel.from_pretrained(tmp_path / "cn2")]
        image, scale = images, [0.6, 1.3]
    theirs = _diffusers_pipe(pipe, theirs_nets)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = dict(guidance_scale=4.0, latents=latents, height=SIZE, width=SIZE, controlnet_conditioning_scale=scale,
              guess_mode=case == "guess_mode_negative_prompt", original_size=(48, 40), crops_coords_top_left=(4, 2),
              target_size=(SIZE, 24), negative_prompt=["blue", "green"] if case.endswith("negative_prompt") else None)
    output_type = "pt" if case == "two_controlnets" else "latent"
    pipe.controlnet, saved = nets, pipe.controlnet
    try:
        got = pipe(PROMPTS, image, sampler="ddim", steps=5, time_grid="trailing", output_type=output_type, **kw).images
        if case == "micro_cond_zero_negative":  # the micro-conditioning reaches the UNet: parity can fail on it
            other = pipe(PROMPTS, image, sampler="ddim", steps=5, output_type=output_type,
                         **{**kw, "crops_coords_top_left": (0, 0)}).images
            assert (other - got).abs().max() > 1e-2
    finally:
        pipe.controlnet = saved
    ref = theirs(PROMPTS, image=[image, image] if case != "two_controlnets" else image, num_inference_steps=5,
                 output_type=output_type, **kw).images
    assert ref.std() > 0.05
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_seed_not_batch_and_scale_zero(pipe, images):
    """Sample i depends on seed + i only (stochastic sampler: its noise too); scale 0 == no ControlNet."""
    kw = dict(sampler="dpmpp_2m_sde", steps=3, guidance_scale=3.0, output_type="latent")
    assert_seed_not_batch_and_scale_zero(pipe, PROMPTS, images[0], **kw)


def test_every_sampler_and_grid_runs(pipe, images):
    """Every registered sampler, each paired with a time grid in turn (every grid used), through diffusion.sample."""
    grids = sorted(TIME_GRIDS)
    for i, name in enumerate(sorted(SAMPLERS)):
        z = pipe(PROMPTS[0], images[0], sampler=name, steps=2, time_grid=grids[i % len(grids)], seed=0,
                 guidance_scale=1.0, output_type="latent", **({"rtol": 0.5} if name == "dpm_adaptive" else {})).images
        assert z.shape == (1, 4, 4, 4) and torch.isfinite(z).all(), name


def test_cn_sample_end_to_end(images, tmp_path):
    images[0].save(tmp_path / "cond.png")
    args = ["--condition", str(tmp_path / "cond.png"), "--model", str(tiny_sdxl()), "--controlnet",
            str(controlnet_dir(tiny_sdxl())), "--steps", "2", "--num_images", "2", "--no_progress", "--guess_mode"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grid.png", "sample_00.png", "sample_01.png",
                                                                  "settings.json"]
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["family"] == "sdxl"
    assert np.asarray(Image.open(tmp_path / "a" / "sample_00.png")).shape == (SIZE, SIZE, 3)
    paths = run([*args, "--out", str(tmp_path / "b"), "--num_images", "1", "--seed", "1"])  # seed 1 = sample 1 above
    diff = np.asarray(Image.open(paths[1])).astype(int) - np.asarray(Image.open(tmp_path / "a" / "sample_01.png"))
    assert np.abs(diff).max() <= 1  # same noise; batched convolutions may round differently in the last bit


def test_cn_sample_rejects_an_sd3_controlnet(images, tmp_path, capsys):
    images[0].save(tmp_path / "cond.png")
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps({"_class_name": "SD3ControlNetModel"}))
    with pytest.raises(SystemExit) as e:
        main(["--condition", str(tmp_path / "cond.png"), "--model", str(tiny_sdxl()), "--controlnet",
              str(tmp_path / "cn"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "holds a SD3ControlNetModel, but a SDXL base takes a ControlNetModel" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("part, msg", [
    ("text_encoder_2/model.safetensors", "text_encoder_2/model.safetensors is truncated"),
    ("tokenizer_2/merges.txt", "tokenizer_2/merges.txt has 0 merges"),
    ("unet/config.json", "unet/config.json is empty")])
def test_cn_sample_names_a_corrupt_sdxl_file(images, tmp_path, capsys, part, msg):
    assert_cn_sample_names_corrupt_part(tiny_sdxl(), part, msg, images[0], tmp_path, capsys)
