"""Model wrappers: time signals, output kinds, diffusers networks, classifier-free guidance."""
import pytest
import torch

import diffusion as d
from diffusion.wrappers import time_signal


def test_time_signal_per_schedule():
    disc, rf = d.get_schedule("scaled_linear"), d.get_schedule("rf")
    t = disc.t_from_timestep(torch.tensor([0, 499, 999]))
    torch.testing.assert_close(time_signal(disc, t), torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64))
    torch.testing.assert_close(time_signal(rf, torch.tensor([0.25])), torch.tensor([250.0]))
    assert time_signal(rf, torch.tensor([0.25]), "t").item() == 0.25
    with pytest.raises(ValueError, match="Discrete"):
        time_signal(rf, torch.tensor([0.5]), "timestep")
    with pytest.raises(ValueError, match="valid"):
        d.wrap_model(lambda x, t: x, rf, time_input="sigma")


def test_wrap_diffusers_unet_sees_integer_timesteps():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    s = d.get_schedule("linear")
    fn = d.wrap_model(unet, s, prediction="epsilon")
    x = torch.randn(2, 3, 8, 8)
    t = s.t_from_timestep(torch.tensor([10, 700])).float()
    x0, eps = fn(x, t)
    with torch.no_grad():
        ref = unet(x, torch.tensor([10.0, 700.0])).sample
    torch.testing.assert_close(eps, ref)
    torch.testing.assert_close(s.add_noise(x0, eps, t), x, rtol=1e-4, atol=1e-4)  # consistent pair
    out = d.sample(fn, x, s, sampler="ddim", steps=3)
    assert out.shape == x.shape and torch.isfinite(out).all()


def _toy_conditional(schedule):
    """x0 prediction = cond * 0.5 + 0.1 x: a conditional model whose guided output is checkable."""
    def fn(x, t, y):
        x0 = 0.5 * y + 0.1 * x
        a, s = d.append_dims(schedule.alpha(t), x), d.append_dims(schedule.sigma(t), x)
        return x0, (x - a * x0) / s
    fn.schedule = schedule
    return fn


@pytest.mark.parametrize("batched", [True, False])
def test_cfg_is_linear_extrapolation(batched):
    s = d.get_schedule("vp")
    fn = _toy_conditional(s)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64)
    y, y0 = torch.ones(3, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    for scale in (1.0, 0.0, 7.5):
        x0, eps = d.classifier_free_guidance(fn, scale, {"y": y0}, batched=batched)(x, t, y=y)
        c, u = fn(x, t, y)[0], fn(x, t, y0.expand(3, 2))[0]
        torch.testing.assert_close(x0, u + scale * (c - u))
        torch.testing.assert_close(s.add_noise(x0, eps, t), x)


def test_guidance_rescale_matches_std_and_keeps_x():
    s = d.get_schedule("vp")
    fn = _toy_conditional(s)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.full((3,), 0.6, dtype=torch.float64)
    y = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    x0, eps = d.classifier_free_guidance(fn, 7.0, {"y": torch.zeros(1, 4, 5, dtype=torch.float64)}, rescale=1.0,
                                         rescale_kind="x0")(x, t, y=y)
    torch.testing.assert_close(x0.std(dim=(1, 2)), fn(x, t, y)[0].std(dim=(1, 2)))  # phi = 1: std of cond branch
    torch.testing.assert_close(s.add_noise(x0, eps, t), x)
    with pytest.raises(ValueError, match="rescale"):
        d.classifier_free_guidance(fn, 2.0, {}, rescale=1.5)
