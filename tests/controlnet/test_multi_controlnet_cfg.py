"""Several ControlNets under classifier-free guidance, batches of 2 and 3, guess mode on and off: every image of a
batch equals the image drawn alone with its seed, and the batch equals diffusers' StableDiffusionControlNetPipeline
with a MultiControlNetModel on the same weights and latents."""
import numpy as np
import pytest
import torch

from controlnet import ControlNet
from controlnet.pipeline import ControlNetPipeline

from .sd_fixtures import fill_data, tiny_sd
from .tiny import randomize

PROMPTS = ["red circle with blue background", "yellow circle with black background", "green circle with white background"]


@pytest.fixture(scope="module")
def pipe():
    p = ControlNetPipeline.from_pretrained(tiny_sd())
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(randomize(ControlNet.from_unet(p.unet), seed=seed, std=0.05).eval())
    p.controlnet = nets
    return p


@pytest.fixture(scope="module")
def conditions():
    """Two condition images per sample (one per ControlNet), all different."""
    from PIL import Image
    imgs = [Image.open(fill_data() / "source" / f"{i}.png").convert("RGB") for i in range(6)]
    return [imgs[:3], imgs[3:]]


@pytest.mark.parametrize("guess_mode", [False, True])
@pytest.mark.parametrize("batch", [2, 3])
def test_batch_equals_each_image_alone(pipe, conditions, batch, guess_mode):
    kw = dict(sampler="ddim", steps=3, guidance_scale=3.0, guess_mode=guess_mode, output_type="latent")
    out = pipe(PROMPTS[:batch], [c[:batch] for c in conditions], seed=10, **kw).images
    assert out.shape[0] == batch and torch.isfinite(out).all()
    for i in range(batch):
        alone = pipe(PROMPTS[i], [c[i] for c in conditions], seed=10 + i, **kw).images
        torch.testing.assert_close(out[i:i + 1], alone, atol=5e-5, rtol=1e-5)  # batched-convolution rounding
    # each ControlNet's condition matters for its own sample only
    swapped = pipe(PROMPTS[:batch], [conditions[0][:batch], conditions[1][:batch][::-1]], seed=10, **kw).images
    assert (swapped[0] - out[0]).abs().max() > 1e-4


@pytest.mark.parametrize("guess_mode", [False, True])
def test_parity_with_diffusers_multicontrolnet(pipe, conditions, tmp_path, guess_mode):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    nets = []
    for i, net in enumerate(pipe.controlnet):
        net.save_pretrained(tmp_path / f"cn{i}")
        nets.append(ControlNetModel.from_pretrained(tmp_path / f"cn{i}").eval())
    theirs = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=nets,
        scheduler=DDIMScheduler.from_config(pipe.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = dict(guidance_scale=4.0, latents=latents, output_type="pt", height=32, width=32, guess_mode=guess_mode,
              controlnet_conditioning_scale=[1.0, 0.7])
    per_sample = [[c[i] for c in conditions] for i in range(3)]  # diffusers: one sublist per sample
    ref = theirs(PROMPTS, image=per_sample, num_inference_steps=5, **kw).images
    got = pipe(PROMPTS, conditions, sampler="ddim", steps=5, time_grid="trailing", **kw).images
    assert ref.std() > 0.01
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
    assert np.abs((got[0] - got[1]).numpy()).max() > 1e-3  # the samples differ: per-sample conditions were used
