"""Grid options forwarded from sample(), the sigma-space entry point, and the grids' default end on VE."""
import pytest
import torch

import diffusion as d
from diffusion.gmm import GaussianMixture
from diffusion.timesteps import get_timesteps, timesteps_from_sigmas

GAUSS = GaussianMixture(torch.tensor([[0.5, -1.0, 0.2, 0.0]], dtype=torch.float64), 0.5)


def _calls(schedule):
    """The exact Gaussian denoiser, recording the times it is called at."""
    fn, seen = GAUSS.denoiser(schedule), []

    def model(x, t):
        seen.append(t.double().clone())
        return fn(x, t)
    return model, seen


@pytest.mark.parametrize("grid", ["karras", "log_snr"])
def test_ve_grids_end_at_the_trained_sigma_min(grid):
    """On VE(0.002, 80) karras and log_snr used to run down to sigma 2.9e-4 (t = 1e-3); they end at sigma_min."""
    s = d.VE(0.002, 80.0)
    ts = get_timesteps(grid, 6, s)
    sig = s.edm_sigma(ts[:-1])
    torch.testing.assert_close(sig[-1], torch.tensor(0.002, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(sig[0], torch.tensor(80.0, dtype=torch.float64), rtol=1e-9, atol=0)


def test_grid_options_reach_the_grid():
    s = d.get_schedule("vp_linear")
    model, seen = _calls(s)
    x = d.prior_sample((4, 4), s, generator=0, dtype=torch.float64)
    d.sample(model, x, s, sampler="euler", steps=5, time_grid="karras",
             grid_options={"sigma_min": 0.01, "sigma_max": 20.0, "rho": 3.0})
    sig = s.edm_sigma(torch.stack([t[0] for t in seen]))
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    ref = (20.0 ** (1 / 3) + ramp * (0.01 ** (1 / 3) - 20.0 ** (1 / 3))) ** 3
    torch.testing.assert_close(sig, ref, rtol=1e-5, atol=0)  # float32 time tensors
    seen.clear()
    rf = d.RectifiedFlow()
    d.sample(GAUSS.denoiser(rf), x, rf, sampler="flow_euler", steps=4, time_grid="shifted", grid_options={"shift": 2.0})


def test_unknown_grid_option_lists_the_grids_options():
    s = d.get_schedule("vp_linear")
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'karras'.*sigma_mn.*rho, sigma_max, sigma_min"):
        d.sample(GAUSS.denoiser(s), x, s, time_grid="karras", grid_options={"sigma_mn": 0.01})
    with pytest.raises(ValueError, match=r"'log_snr'.*shift.*t_max"):
        get_timesteps("log_snr", 4, s, shift=3.0)
    with pytest.raises(ValueError, match="sigma_min"):
        d.sample(GAUSS.denoiser(s), x, s, time_grid="karras", grid_options={"sigma_min": 5.0, "sigma_max": 1.0})
    with pytest.raises(ValueError, match="grid_options"):
        d.sample(GAUSS.denoiser(s), x, s, timesteps=[1.0, 0.5, 0.0], grid_options={"rho": 7.0})
    with pytest.raises(ValueError, match="one of"):
        d.sample(GAUSS.denoiser(s), x, s, timesteps=[1.0, 0.5, 0.0], sigmas=[10.0, 1.0, 0.0])


@pytest.mark.parametrize("name", ["vp_linear", "ve", "scaled_linear", "rectified_flow"])
def test_sigmas_entry_point_is_the_t_grid(name):
    """sigmas= (EDM sigma / alpha, k-diffusion's convention) is converted to t once: the model is called at
    exactly those noise levels and the result equals sampling on the converted t grid."""
    s = d.get_schedule(name)
    limit = float(s.edm_sigma(torch.tensor(s.t_max, dtype=torch.float64)))
    sigmas = [min(limit, 40.0) * 0.999, 3.0, 0.7, 0.1, 0.02, 0.0]
    model, seen = _calls(s)
    x = d.prior_sample((4, 4), s, generator=1, dtype=torch.float64)
    a = d.sample(model, x, s, sampler="dpmpp_2m", sigmas=sigmas)
    torch.testing.assert_close(s.edm_sigma(torch.stack([t[0] for t in seen])),
                               torch.tensor(sigmas[:-1], dtype=torch.float64), rtol=1e-9, atol=0)
    b = d.sample(GAUSS.denoiser(s), x, s, sampler="dpmpp_2m", timesteps=timesteps_from_sigmas(sigmas, s))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_sigmas():
    s = d.get_schedule("scaled_linear")
    fn = GAUSS.denoiser(s)
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="end at 0"):
        d.sample(fn, x, s, sigmas=[10.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="decreasing"):
        d.sample(fn, x, s, sigmas=[1.0, 10.0, 0.0])
    with pytest.raises(ValueError, match=r"largest EDM sigma 14.6"):
        d.sample(fn, x, s, sigmas=[80.0, 1.0, 0.0])
