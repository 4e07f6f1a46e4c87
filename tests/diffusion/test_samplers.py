"""Samplers on Gaussian data, whose PF-ODE solution is closed-form, plus exact identities."""
import math

import pytest
import torch

import diffusion as d
from diffusion.gmm import GaussianMixture, random_mixture
from diffusion.samplers import sample_ddim, sample_ddpm, sample_euler, sample_heun
from diffusion.timesteps import TIME_GRIDS, check_timesteps, get_timesteps, timesteps_karras

MU = torch.tensor([[0.5, -1.0, 0.2, 0.0]], dtype=torch.float64)
C = 0.5
GAUSS = GaussianMixture(MU, C)


def ode_solution(schedule, x_T):
    """For N(mu, c^2 I) data the PF-ODE keeps (x_t - alpha mu) / sqrt(alpha^2 c^2 + sigma^2) fixed."""
    t = torch.tensor(schedule.t_max, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    return MU + C * (x_T - a * MU) / torch.sqrt(a ** 2 * C ** 2 + s ** 2)


# (sampler, order, schedule, grid)
ORDERS = [("ddim", 1, "vp_linear", "log_snr"), ("euler", 1, "cosine", "log_snr"),
          ("heun", 2, "vp_linear", "log_snr"), ("dpmpp_2m", 2, "ve", "log_snr"),
          ("dpmpp_3m", 2.4, "cosine", "log_snr"), ("flow_euler", 1, "rectified_flow", "uniform"),
          ("flow_heun", 2, "rectified_flow", "uniform")]


@pytest.mark.parametrize("sampler,order,name,grid", ORDERS)
def test_convergence_order_on_gaussian(sampler, order, name, grid):
    s = d.get_schedule(name)
    x_T = d.prior_sample((32, 4), s, generator=0, dtype=torch.float64)
    exact = ode_solution(s, x_T)
    errs = [(d.sample(GAUSS.denoiser(s), x_T, s, sampler=sampler, steps=n, time_grid=grid) - exact).abs().max()
            for n in (40, 80)]
    assert errs[1] < 0.05
    assert math.log2(errs[0] / errs[1]) > order - 0.3


def test_euler_is_ddim_and_ddpm_is_ddim_eta1():
    s = d.get_schedule("scaled_linear")
    gm = random_mixture(8, 4, seed=1)
    x_T = d.prior_sample((16, 8), s, generator=3, dtype=torch.float64)
    ts = get_timesteps("trailing", 12, s)
    fn = gm.denoiser(s)
    torch.testing.assert_close(sample_euler(fn, x_T, ts, s), sample_ddim(fn, x_T, ts, s), rtol=1e-10, atol=1e-10)
    a = sample_ddpm(fn, x_T, ts, s, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(fn, x_T, ts, s, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


CHURN = {"s_churn": 5.0, "s_tmax": 100.0}  # vp_linear's largest EDM sigma is 152: churn all but the first step


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddim", {"eta": 0.7}), ("euler", CHURN),
                                          ("heun", CHURN), ("dpmpp_2m", {})])
def test_sample_depends_on_seed_not_batch(sampler, opts):
    s = d.get_schedule("vp_linear")
    fn = random_mixture(6, 3, seed=2).denoiser(s)
    seeds = [10, 11, 12, 13]
    x4 = d.sample(fn, d.prior_sample((4, 6), s, seeds, dtype=torch.float64), s, sampler=sampler, steps=8,
                  generator=[100 + k for k in seeds], **opts)
    x2 = d.sample(fn, d.prior_sample((2, 6), s, seeds[2:], dtype=torch.float64), s, sampler=sampler, steps=8,
                  generator=[100 + k for k in seeds[2:]], **opts)
    torch.testing.assert_close(x4[2:], x2, rtol=1e-12, atol=1e-12)


def _counting(fn):
    calls = []

    def counted(x, t):
        calls.append(t)
        return fn(x, t)
    return counted, calls


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_churn_beyond_the_schedule_is_rejected_before_sampling(sampler):
    """On an SD table the first step's churned sigma lies beyond the last timestep: a clear error, no model call."""
    s = d.get_schedule("scaled_linear")
    fn, calls = _counting(GAUSS.denoiser(s))
    x = d.prior_sample((8, 4), s, generator=0, dtype=torch.float64)
    ts = get_timesteps("karras", 20, s)
    limit = float(s.edm_sigma(torch.tensor(1.0, dtype=torch.float64)))  # 14.61
    with pytest.raises(ValueError, match=rf"s_churn.*{limit:.4g}.*s_tmax"):
        sampler(fn, x, ts, s, s_churn=10.0, generator=torch.Generator().manual_seed(0))
    assert not calls
    with pytest.raises(ValueError, match="s_churn"):
        sampler(fn, x, ts, s, s_churn=-1.0)


def test_churn_below_the_limit_changes_the_sample_and_keeps_the_marginal():
    """Heun with churn on every step below s_tmax, exact Gaussian denoiser: the sample moves, its law does not."""
    s = d.get_schedule("scaled_linear")
    fn = GAUSS.denoiser(s)
    t = torch.tensor(1.0, dtype=torch.float64)
    a, sg = s.alpha(t), s.sigma(t)
    z = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = a * MU + torch.sqrt(a ** 2 * C ** 2 + sg ** 2) * z  # the exact marginal at t = 1
    ts = get_timesteps("karras", 40, s)
    churned = sample_heun(fn, x_T, ts, s, s_churn=40.0, s_tmax=10.0, generator=torch.Generator().manual_seed(1))
    plain = sample_heun(fn, x_T, ts, s)
    assert (churned - plain).abs().mean() > 0.3  # measured 0.57: the churn is applied
    # measured std 0.501-0.515 (std error 0.006 over 4000 samples); Euler with the same churn gives 0.43-0.44
    torch.testing.assert_close(churned.std(0), torch.full((4,), C, dtype=torch.float64), rtol=0, atol=0.025)
    torch.testing.assert_close(churned.mean(0), MU[0], rtol=0, atol=0.03)


def test_churn_without_noise_draws_none():
    s = d.get_schedule("scaled_linear")
    fn = GAUSS.denoiser(s)
    x = d.prior_sample((8, 4), s, generator=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    sample_euler(fn, x, get_timesteps("karras", 10, s), s, s_churn=5.0, s_tmax=10.0, s_noise=0.0, generator=gen)
    assert torch.equal(gen.get_state(), state)


def test_raw_prediction_entry_point_matches_wrapped():
    s = d.get_schedule("cosine")
    fn = GAUSS.denoiser(s)

    def v_net(x, t):  # the same exact model, reporting a v-prediction
        x0, eps = fn(x, t)
        return d.target("v", x0, eps, t, s)

    x_T = d.prior_sample((8, 4), s, generator=1, dtype=torch.float64)
    a = d.sample(v_net, x_T, s, sampler="dpmpp_2m", steps=10, prediction="v")
    b = d.sample(fn, x_T, s, sampler="dpmpp_2m", steps=10)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grid", sorted(TIME_GRIDS))
@pytest.mark.parametrize("name", ["scaled_linear", "vp_linear", "rectified_flow"])
def test_grids_end_at_zero(grid, name):
    s = d.get_schedule(name)
    if grid == "leading" and name != "scaled_linear":
        with pytest.raises(ValueError, match="Discrete"):
            get_timesteps(grid, 10, s)
        return
    ts = check_timesteps(get_timesteps(grid, 10, s))
    assert len(ts) == 11 and ts[-1] == 0 and ts[0] <= 1


def test_karras_grid_closed_form():
    s = d.get_schedule("vp_linear")
    ts = timesteps_karras(6, s, rho=7.0, sigma_min=0.002, sigma_max=80.0)
    sig = s.edm_sigma(ts[:-1])
    i = torch.arange(6, dtype=torch.float64) / 5
    ref = (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sig, ref, rtol=1e-8, atol=0)


def test_trailing_grid_matches_diffusers_timesteps():
    from diffusers import DDIMScheduler
    s = d.get_schedule("scaled_linear")
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    ref.set_timesteps(7)
    ts = get_timesteps("trailing", 7, s)
    torch.testing.assert_close(s.timestep_from_t(ts[:-1]), ref.timesteps.double())


def test_bad_input():
    s = d.get_schedule("vp")
    fn = GAUSS.denoiser(s)
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="valid"):
        d.sample(fn, x, s, sampler="plms")
    with pytest.raises(ValueError, match="steps"):
        d.sample(fn, x, s, steps=0)
    with pytest.raises(ValueError, match="end at t = 0"):
        d.sample(fn, x, s, timesteps=[1.0, 0.5, 0.1])
    with pytest.raises(ValueError, match="decreasing"):
        d.sample(fn, x, s, timesteps=[0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="valid"):
        d.sample(fn, x, s, time_grid="cubic")
    with pytest.raises(FloatingPointError, match="not finite"):
        d.sample(lambda x, t: (x * float("nan"), x), x, s, steps=2)
    with pytest.raises(ValueError, match="shapes"):
        d.sample(lambda x, t: (x[:, :2], x), x, s, steps=2)
    with pytest.raises(ValueError, match="generators"):
        d.sample(fn, x, s, sampler="ddpm", steps=2, generator=[torch.Generator()])


def test_gmm_posterior_mean_matches_componentwise_form():
    """The matmul-form E[x0 | x_t] equals the per-component sum it is derived from."""
    gm = random_mixture(6, 5, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    a, s = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    v = a[:, None] ** 2 * gm.stds ** 2 + s[:, None] ** 2  # (B, K)
    d2 = ((x[:, None, :] - a[:, None, None] * gm.means[None]) ** 2).sum(-1)
    w = torch.softmax(torch.log(gm.weights) - 3 * torch.log(v) - d2 / (2 * v), dim=1)
    per = gm.means[None] + (a[:, None] * gm.stds ** 2 / v)[..., None] * (x[:, None, :] - a[:, None, None] * gm.means[None])
    torch.testing.assert_close(gm.posterior_mean(x, a, s), (w[..., None] * per).sum(1), rtol=1e-12, atol=1e-12)


def test_sliced_w2_exact_quantiles():
    """Projected quantiles invert the exact 1-D mixture CDF; SW2 of exact samples is small, of shifted ones not."""
    gm = random_mixture(4, 3, seed=4)
    u = torch.nn.functional.normalize(torch.randn(2, 4, dtype=torch.float64), dim=1)
    p = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    q = gm.projected_quantiles(u, p)
    comp = torch.distributions.Normal((u @ gm.means.T)[:, None, :], gm.stds)  # (P, 1, K)
    cdf = (gm.weights * comp.cdf(q[..., None])).sum(-1)
    torch.testing.assert_close(cdf, p.expand(2, 3), rtol=0, atol=1e-10)
    x = gm.sample(4000, torch.Generator().manual_seed(1))
    assert gm.sliced_w2(x) < 0.05 < gm.sliced_w2(x + 0.3)
