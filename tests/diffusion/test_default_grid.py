"""The default time grid (diffusion.timesteps.default_time_grid): a measured function of schedule, sampler, steps."""
import pytest
import torch

from diffusion import VE, Discrete, RectifiedFlow, TIME_GRIDS, VPLinear, get_timesteps, prior_sample, sample
from diffusion.gmm import GaussianMixture, random_mixture
from diffusion.timesteps import DEFAULT_GRIDS, default_time_grid, schedule_kind


def test_rule_table_is_well_formed():
    for kind, rows in DEFAULT_GRIDS.items():
        assert kind in ("vp", "vp_short", "vp_zero", "ve", "flow")
        for sampler, rule in rows.items():
            firsts = [first for first, _ in rule]
            assert firsts[0] == 1 and firsts == sorted(set(firsts)), (kind, sampler)
            assert all(grid in TIME_GRIDS for _, grid in rule), (kind, sampler)


def test_schedule_kinds():
    assert schedule_kind(Discrete("scaled_linear")) == "vp_short"  # terminal log-SNR -5.4
    assert schedule_kind(Discrete("linear")) == "vp" == schedule_kind(VPLinear())
    assert schedule_kind(Discrete("scaled_linear", rescale_betas_zero_snr=True)) == "vp_zero"
    assert schedule_kind(VE()) == "ve"
    assert schedule_kind(RectifiedFlow()) == "flow" and schedule_kind(RectifiedFlow(3.0)) == "flow_shifted"


def test_defaults_follow_sampler_and_steps():
    sd, linear = Discrete("scaled_linear"), Discrete("linear")
    assert default_time_grid(sd, "dpmpp_2m", 10) == "log_snr"
    assert default_time_grid(sd, "heun", 3) == "trailing" and default_time_grid(sd, "heun", 10) == "karras"
    assert default_time_grid(sd, "heun", 5) == "blend"  # 10 NFE: trailing was 1.26x the best grid
    assert default_time_grid(linear, "heun", 10) == "blend" and default_time_grid(linear, "heun", 25) == "log_snr"
    assert default_time_grid(sd, "ddpm", 10) == "trailing"  # unmeasured (stochastic): unchanged
    assert default_time_grid(sd, "dpmpp_2m_sde", 10) == default_time_grid(sd, "dpmpp_2m", 10)
    assert default_time_grid(RectifiedFlow(3.0), "dpmpp_2m", 50) == "shifted"  # the model's own shift is kept
    assert default_time_grid(VE(), "dpmpp_2m", 10) == "trailing"
    assert default_time_grid(sd, "dpmpp_2m", 0) == "log_snr"  # bad steps are reported by the grid itself
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(lambda x, t: (x, x), torch.zeros(1, 2), sd, steps=0)


def test_blend_grid_lies_between_uniform_and_log_snr():
    for schedule in (Discrete("scaled_linear"), VE(0.002, 80.0), RectifiedFlow()):
        uniform, log_snr = (get_timesteps(g, 7, schedule) for g in ("uniform", "log_snr"))
        torch.testing.assert_close(get_timesteps("blend", 7, schedule, weight=0.0), uniform, atol=0, rtol=0)
        torch.testing.assert_close(get_timesteps("blend", 7, schedule, weight=1.0), log_snr, atol=0, rtol=0)
        torch.testing.assert_close(get_timesteps("blend", 7, schedule), 0.25 * uniform + 0.75 * log_snr)
    with pytest.raises(ValueError, match="0 <= weight <= 1"):
        get_timesteps("blend", 5, Discrete("scaled_linear"), weight=1.5)


CHEAP = {"32-D mix": lambda: random_mixture(32, 16, seed=0),
         "16-D aniso": lambda: _anisotropic()}


def _anisotropic():
    """The anisotropic mixture of benchmarks/gmm_samplers.py (axis scales 3.2 -> 0.03, weights 0.6^k)."""
    g = random_mixture(16, 8, seed=1, std_range=(0.02, 0.1))
    return GaussianMixture(g.means * 10 ** torch.linspace(0.5, -1.5, 16, dtype=torch.float64), g.stds,
                           0.6 ** torch.arange(8, dtype=torch.float64))


@pytest.mark.parametrize("problem, sampler, steps", [("32-D mix", "dpmpp_2m", 10), ("32-D mix", "unipc", 10),
                                                     ("16-D aniso", "heun", 5), ("32-D mix", "heun", 10),
                                                     ("32-D mix", "dpm_2", 5), ("16-D aniso", "lms", 10)])
def test_default_grid_near_the_best_on_an_exact_score(problem, sampler, steps):
    """On SD's table (exact mixture denoiser, 256 samples) the default grid at 10 NFE and 20 NFE is within 1.2x of the
    best named grid (RMSE to a 400-step solution); heun at 5 steps used to be 1.26x (trailing vs log_snr)."""
    mix, schedule = CHEAP[problem](), Discrete("scaled_linear")
    fn = mix.denoiser(schedule)
    x_T = prior_sample((256, mix.dim), schedule, 0, dtype=torch.float64)
    ref = sample(fn, x_T, schedule, "dpmpp_2m", steps=400, time_grid="log_snr")

    def err(**grid):
        return float((sample(fn, x_T, schedule, sampler, steps=steps, **grid) - ref).pow(2).mean().sqrt())

    named = {g: err(time_grid=g) for g in sorted(TIME_GRIDS)}
    default = err()
    assert default <= 1.2 * min(named.values()), (default_time_grid(schedule, sampler, steps), named)


@pytest.mark.parametrize("rho", [3.0, 10.0, 25.0])
def test_karras_grid_starts_exactly_at_t_max_for_any_rho(rho):
    """(sigma_max^(1/rho))^rho can round above sigma_max: the grid then started beyond t = 1 and was rejected."""
    for n in (5, 10, 20):
        ts = get_timesteps("karras", n, Discrete("scaled_linear"), rho=rho)
        assert float(ts[0]) == 1.0 and bool((ts[1:] < ts[:-1]).all())
