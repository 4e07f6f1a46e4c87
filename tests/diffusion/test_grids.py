"""Time grids that start from pure noise (alpha(t_max) = 0: zero-terminal-SNR tables, rectified flow)."""
import pytest
import torch

from diffusion import Discrete, RectifiedFlow, get_schedule, get_timesteps, sample
from diffusion.gmm import SlicedW2, random_mixture
from diffusion.timesteps import LOG_SNR_FIRST_STEP

F64 = torch.float64
PURE_NOISE = {"ztsnr": lambda: Discrete("scaled_linear", rescale_betas_zero_snr=True), "rf": RectifiedFlow}


@pytest.mark.parametrize("name", sorted(PURE_NOISE))
@pytest.mark.parametrize("n", [2, 5, 10, 20])
def test_log_snr_grid_from_pure_noise_is_uniform_after_one_step(name, n):
    """Regression: log-SNR -30 at t_max put 4-5 of 10 steps above t = 0.99 (and a gap from timestep 503 to 48)."""
    s = PURE_NOISE[name]()
    ts = get_timesteps("log_snr", n, s)
    assert len(ts) == n + 1 and ts[0] == s.t_max == 1.0 and ts[-1] == 0 and s.alpha(ts[:1]).item() == 0
    lam = s.log_snr(ts[1:-1])
    assert lam[0].item() == pytest.approx(LOG_SNR_FIRST_STEP, abs=1e-9)
    assert int((ts > 0.99).sum()) == 1  # only the start
    if n > 2:
        steps = lam.diff()
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=1e-9)


def test_log_snr_grid_unchanged_where_log_snr_is_finite():
    s = get_schedule("linear")  # the shipped default's table: finite log-SNR at t = 1
    lam = s.log_snr(torch.tensor([1.0, 1e-3], dtype=F64))
    ref = s.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), 10, dtype=F64))
    torch.testing.assert_close(get_timesteps("log_snr", 10, s)[:-1], ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(PURE_NOISE))
def test_log_snr_grid_error_on_exact_mixture(name):
    """DPM-Solver++(2M), 10 steps, exact mixture score: the new grid is near the sampling floor and several times
    more accurate than the previous one (full table: python benchmarks/ztsnr_grid.py)."""
    s = PURE_NOISE[name]()
    mixture, n = random_mixture(32, 16, seed=0), 2000
    w2 = SlicedW2(mixture, n_proj=64, levels=n, seed=0)
    x_T = torch.randn(n, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    floor = w2(mixture.sample(n, torch.Generator().manual_seed(123)))
    lam = s.log_snr(torch.tensor([1.0, 1e-3], dtype=F64)).clamp(-30, 30)
    previous = torch.cat([s.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), 10, dtype=F64)),
                          torch.zeros(1, dtype=F64)])
    previous[0] = 1.0
    err = {k: w2(sample(mixture.denoiser(s), x_T.clone(), s, sampler="dpmpp_2m", timesteps=ts))
           for k, ts in (("new", get_timesteps("log_snr", 10, s)), ("previous", previous))}
    assert err["new"] < 2 * floor and err["new"] < 0.4 * err["previous"], (err, floor)
