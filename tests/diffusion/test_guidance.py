"""Guidance rescale (Lin et al. 2024, Sec. 3.4) in diffusers' semantics: on the network's own output (eps for
eps-models, v for v-models), parity with diffusers' rescale_noise_cfg; the x0 variant stays a named option."""
import pytest
import torch

import diffusion as d


def _rescale_noise_cfg():
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    except ImportError:  # older / newer layouts
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    return rescale_noise_cfg


def _net(x, signal, y):
    """A conditional toy network: output depends non-linearly on x, the time signal and the condition y."""
    return torch.tanh(0.7 * x + y) * (1 + signal[:, None, None, None] / 1000) - 0.3 * y


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("phi", [0.7, 1.0])
def test_rescale_matches_diffusers_rescale_noise_cfg(kind, phi):
    schedule = d.get_schedule("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 6, generator=g)
    y, y0 = torch.randn(3, 4, 6, 6, generator=g), torch.zeros(3, 4, 6, 6)
    n = torch.tensor([999, 500, 20])
    t = schedule.t_from_timestep(n).float()
    scale = 7.5
    fn = d.wrap_model(_net, schedule, kind)
    x0, eps = d.classifier_free_guidance(fn, scale, {"y": y0}, rescale=phi)(x, t, y=y)
    # diffusers: the pipeline's own steps on the raw network outputs
    out_c, out_u = _net(x, n.float(), y), _net(x, n.float(), y0)
    ref = _rescale_noise_cfg()(out_u + scale * (out_c - out_u), out_c, guidance_rescale=phi)
    ours = d.target(kind, x0, eps, t, schedule)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)
    ref_x0, ref_eps = d.to_x0_eps(kind, ref, x, t, schedule)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(eps, ref_eps, rtol=1e-5, atol=2e-5)


def test_x0_variant_is_a_named_option_and_keeps_x():
    s = d.get_schedule("vp")

    def fn(x, t, y):
        x0 = 0.5 * y + 0.1 * x
        a, sg = d.append_dims(s.alpha(t), x), d.append_dims(s.sigma(t), x)
        return x0, (x - a * x0) / sg
    fn.schedule, fn.prediction = s, "x0"
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.full((3,), 0.6, dtype=torch.float64)
    y = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    uncond = {"y": torch.zeros(1, 4, 5, dtype=torch.float64)}
    for kind in ("x0", "eps", "v"):
        x0, eps = d.classifier_free_guidance(fn, 7.0, uncond, rescale=1.0, rescale_kind=kind)(x, t, y=y)
        c = d.target(kind, *fn(x, t, y), t, s)
        torch.testing.assert_close(d.target(kind, x0, eps, t, s).std(dim=(1, 2)), c.std(dim=(1, 2)))  # phi = 1
        torch.testing.assert_close(s.add_noise(x0, eps, t), x)  # still a consistent (x0, eps) pair at x_t
    with pytest.raises(ValueError, match="rescale_kind"):
        d.classifier_free_guidance(fn, 2.0, {}, rescale=0.5, rescale_kind="noise")
    raw = lambda x, t, y: fn(x, t, y)  # noqa: E731  (no .prediction: the output kind is unknown)
    raw.schedule = s
    with pytest.raises(ValueError, match="rescale_kind"):
        d.classifier_free_guidance(raw, 2.0, uncond, rescale=0.5)
    d.classifier_free_guidance(raw, 2.0, uncond)  # no rescale: no kind needed


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pipeline_guidance_rescale_matches_diffusers(prediction_type):
    """End to end: ControlNetPipeline(guidance_rescale=0.7) == StableDiffusionPipeline(guidance_rescale=0.7)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from controlnet.pipeline import ControlNetPipeline

    from ..controlnet.sd_fixtures import tiny_sd

    ours = ControlNetPipeline.from_pretrained(tiny_sd(prediction_type))
    theirs = StableDiffusionPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        scheduler=DDIMScheduler.from_config(ours.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    prompts = ["red circle with blue background", "yellow circle with black background"]
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = dict(guidance_scale=6.0, guidance_rescale=0.7, latents=latents, output_type="pt", height=32, width=32)
    ref = theirs(prompts, num_inference_steps=5, **kw).images
    got = ours(prompts, sampler="ddim", steps=5, time_grid="trailing", **kw).images
    plain = ours(prompts, sampler="ddim", steps=5, time_grid="trailing", **{**kw, "guidance_rescale": 0.0}).images
    assert (plain - ref).abs().max() > 1e-3  # the rescale changes the images, so the parity below can fail
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
