"""Pipeline outputs follow diffusers' convention: an output object with `.images`, output_type pil / np / pt /
latent with diffusers' types, shapes and values, return_dict=False a tuple."""
import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlNet
from controlnet.pipeline import OUTPUT_TYPES, ControlNetPipeline, ControlNetPipelineOutput

from .sd_fixtures import fill_data, tiny_sd
from .tiny import randomize

PROMPTS = ["red circle with blue background", "yellow circle with black background"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Ours and diffusers' StableDiffusionControlNetPipeline on the same weights (DDIM trailing == our ddim)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    ours = ControlNetPipeline.from_pretrained(tiny_sd())
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cn") / "cn"
    randomize(ControlNet.from_unet(ours.unet), seed=0, std=0.05).save_pretrained(folder)
    ours.controlnet = ControlNet.from_pretrained(folder).eval()
    theirs = StableDiffusionControlNetPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        controlnet=ControlNetModel.from_pretrained(folder).eval(),
        scheduler=DDIMScheduler.from_config(ours.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def _call(pipes, output_type, **kw):
    ours, theirs = pipes
    cond = Image.open(fill_data() / "source" / "0.png").convert("RGB")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    common = dict(guidance_scale=4.0, latents=latents, height=32, width=32, output_type=output_type)
    got = ours(PROMPTS, [cond, cond], sampler="ddim", steps=5, time_grid="trailing", **common, **kw)
    ref = theirs(PROMPTS, image=[cond, cond], num_inference_steps=5, **common, **kw)
    return got, ref


@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
def test_output_object_types_shapes_and_values_match_diffusers(pipes, output_type):
    from diffusers.utils import BaseOutput

    got, ref = _call(pipes, output_type)
    assert isinstance(got, ControlNetPipelineOutput) and isinstance(got, BaseOutput)
    assert list(got.keys()) == ["images"] and got[0] is got.images and got["images"] is got.images
    a, b = got.images, ref.images
    assert type(a) is type(b)
    if output_type == "pil":
        assert len(a) == len(b) == 2 and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in a)
        diff = np.abs(np.stack([np.asarray(x, dtype=int) for x in a]) - np.stack([np.asarray(x, int) for x in b]))
        assert diff.max() <= 1
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    if output_type == "np":
        assert a.shape == (2, 32, 32, 3) and a.min() >= 0 and a.max() <= 1
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
    else:
        assert a.shape == ((2, 3, 32, 32) if output_type == "pt" else (2, 4, 4, 4))
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_return_dict_false_returns_a_tuple_of_the_images(pipes, output_type):
    got, _ = _call(pipes, output_type)
    plain, _ = _call(pipes, output_type, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1
    assert type(plain[0]) is type(got.images)
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(got.images))
    assert got.to_tuple()[0] is got.images


def test_pil_images_are_the_rounded_np_images(pipes):
    got, _ = _call(pipes, "np")
    pil, _ = _call(pipes, "pil")
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pil.images]),
                                  (got.images * 255).round().astype(np.uint8))


def test_unknown_output_type_names_the_choices(pipes):
    with pytest.raises(ValueError, match="output_type must be one of pil, np, pt, latent; got 'jpeg'"):
        pipes[0](PROMPTS[0], Image.new("RGB", (32, 32)), steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="output_type must be one of pt, np, pil"):
        ControlNetPipeline.postprocess(torch.zeros(1, 3, 4, 4), "latent")
