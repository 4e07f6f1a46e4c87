"""ControlNetPipeline on the tiny SD: real loaders, identity of a fresh ControlNet, diffusers parity, samplers."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlNet
from controlnet.pipeline import ControlNetPipeline, load_components

from .sd_fixtures import fill_data, make_fill_dataset, make_tiny_sd, tiny_sd
from .tiny import randomize

PROMPTS = ["red circle with blue background", "yellow circle with black background"]


@pytest.fixture(scope="module")
def pipe():
    return ControlNetPipeline.from_pretrained(tiny_sd())


@pytest.fixture(scope="module")
def cond_image():
    return Image.open(fill_data() / "source" / "0.png").convert("RGB")


def random_controlnet(unet, seed=0):
    """A ControlNet whose zero convolutions are not zero, so it changes the UNet's output."""
    torch.manual_seed(seed)
    return randomize(ControlNet.from_unet(unet), seed=seed, std=0.05).eval()


# ----------------------------------------------------------------------------------------------- fixture
def test_tiny_sd_is_a_real_sd15_directory():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    root = tiny_sd()
    assert sorted(p.name for p in (root / "tokenizer").iterdir()) == \
        ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    sd = StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
    assert sd.scheduler.config.beta_schedule == "scaled_linear" and sd.scheduler.config.prediction_type == "epsilon"
    assert 2 ** (len(sd.vae.config.block_out_channels) - 1) * sd.unet.config.sample_size == 32
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    words = list(make_fill_dataset.PALETTE) + list(make_fill_dataset.PROMPT_WORDS) + list(make_tiny_sd.EXTRA_WORDS)
    for w in words:  # every vocabulary word is one token between BOS and EOS
        assert tok.convert_ids_to_tokens(tok(w).input_ids) == ["<|startoftext|>", w + "</w>", "<|endoftext|>"]
    assert tok.decode(tok("Unseen wörds, 42!").input_ids, skip_special_tokens=True) == "unseen wörds , 4 2 !"
    assert make_tiny_sd.build_bpe(words) == make_tiny_sd.build_bpe(words)


def test_missing_directory_message(tmp_path):
    from controlnet.pipeline_sd3 import load_sd3_components
    from controlnet.pipeline_sdxl import load_sdxl_components

    with pytest.raises(ValueError, match="unet/, vae/, text_encoder/, tokenizer/, scheduler/"):
        load_components(tmp_path)
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"SDXL directory \(missing \['vae', .*'tokenizer_2', 'scheduler'\]\); "
                                         r"expected unet/, .*make_tiny_sdxl\.py \(hub ids"):
        load_sdxl_components(tmp_path)
    with pytest.raises(ValueError, match=r"SD3 directory \(missing \['transformer', .*\(\+ text_encoder_3/, "
                                         r"tokenizer_3/ for T5\) as written by StableDiffusion3Pipeline"):
        load_sd3_components(tmp_path)


# ----------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_fresh_controlnet_is_identity_and_seeds_reproduce(pipe, cond_image, sampler):
    kw = dict(sampler=sampler, steps=4, guidance_scale=3.0, output_type="pt", num_images_per_prompt=2)
    pipe.controlnet = None
    bare = pipe(PROMPTS, seed=5, **kw).images
    pipe.controlnet = ControlNet.from_unet(pipe.unet).eval()  # zero convolutions: exactly the bare UNet
    try:
        out = pipe(PROMPTS, cond_image, seed=5, **kw).images
        assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, bare)
        # sample i gets seed + i whatever the batch (equal up to batch-size-dependent float rounding)
        one = pipe(PROMPTS[1], cond_image, seed=7, **{**kw, "num_images_per_prompt": 1}).images
        torch.testing.assert_close(out[2:3], one, atol=1e-5, rtol=0)
        assert not torch.equal(out, pipe(PROMPTS, cond_image, seed=6, **kw).images)
        pil = pipe(PROMPTS, cond_image, seed=5, **{**kw, "output_type": "pil"}).images  # the same batch as `out`
        assert len(pil) == 4 and pil[0].size == (32, 32)
        np.testing.assert_array_equal(np.asarray(pil[0]), (out[0].permute(1, 2, 0).numpy() * 255).round())
    finally:
        pipe.controlnet = None


def test_controlnet_steers_and_scale_zero_is_bare(pipe, cond_image):
    kw = dict(sampler="ddim", steps=3, guidance_scale=2.0, output_type="latent", seed=0)
    pipe.controlnet = None
    bare = pipe(PROMPTS[0], **kw).images
    pipe.controlnet = random_controlnet(pipe.unet)
    try:
        steered = pipe(PROMPTS[0], cond_image, **kw).images
        assert (steered - bare).abs().max() > 1e-3
        torch.testing.assert_close(pipe(PROMPTS[0], cond_image, controlnet_conditioning_scale=0.0, **kw).images, bare)
        other = pipe(PROMPTS[0], np.zeros((32, 32, 3), np.uint8), **kw).images
        assert (other - steered).abs().max() > 1e-4  # the condition image matters
        guess = pipe(PROMPTS[0], cond_image, guess_mode=True, **kw).images
        assert torch.isfinite(guess).all() and not torch.equal(guess, steered)
        # two ControlNets: scales (1, 0) == the first alone
        pipe.controlnet = [pipe.controlnet, random_controlnet(pipe.unet, seed=1)]
        multi = pipe(PROMPTS[0], [cond_image, cond_image], controlnet_conditioning_scale=[1.0, 0.0], **kw).images
        torch.testing.assert_close(multi, steered, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="2 ControlNets"):
            pipe(PROMPTS[0], cond_image, **kw)
    finally:
        pipe.controlnet = None
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS[0], output_type="jpeg")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_with_diffusers_controlnet_pipeline(tmp_path, cond_image, prediction_type):
    """Same weights, latents and DDIM (trailing, alpha_bar -> 1) steps as diffusers' StableDiffusionControlNetPipeline:
    prompt encoding, CFG, ControlNet residuals, the prediction kind and VAE decoding all agree. (5 steps: diffusers'
    DDIM takes prev_timestep = t - N // steps, which is off the trailing grid unless steps divides N.)"""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    root = tiny_sd(prediction_type)
    ours = ControlNetPipeline.from_pretrained(root)
    random_controlnet(ours.unet).save_pretrained(tmp_path / "cn")
    ours.controlnet = ControlNet.from_pretrained(tmp_path / "cn").eval()
    theirs = StableDiffusionControlNetPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        controlnet=ControlNetModel.from_pretrained(tmp_path / "cn").eval(),
        scheduler=DDIMScheduler.from_config(ours.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = dict(guidance_scale=4.0, latents=latents, output_type="pt", height=32, width=32)
    ref = theirs(PROMPTS, image=[cond_image, cond_image], num_inference_steps=5, **kw).images
    got = ours(PROMPTS, [cond_image, cond_image], sampler="ddim", steps=5, time_grid="trailing", **kw).images
    assert ref.std() > 0.01
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
