"""The sampler catalogue: registration and NFE, convergence of the k-diffusion family on exact Gaussian /
Gaussian-mixture denoisers, Brownian-tree noise, and per-sample seeds."""
import math

import pytest
import torch

import diffusion as d
from diffusion.gmm import GaussianMixture, random_mixture
from diffusion.samplers import SAMPLERS, register_sampler
from diffusion.samplers_sde import BrownianNoise

MU = torch.tensor([[0.5, -1.0, 0.2, 0.0]], dtype=torch.float64)
C = 0.5
GAUSS = GaussianMixture(MU, C)
NEW = ["lms", "dpm_2", "dpm_adaptive", "euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
STOCHASTIC = ["ddpm", "euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
SDE = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]


def ode_solution(schedule, x_T):
    """For N(mu, c^2 I) data the PF-ODE keeps (x_t - alpha mu) / sqrt(alpha^2 c^2 + sigma^2) fixed."""
    t = torch.tensor(schedule.t_max, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    return MU + C * (x_T - a * MU) / torch.sqrt(a ** 2 * C ** 2 + s ** 2)


def counting(fn):
    calls = []

    def counted(x, t, **_):
        calls.append(t)
        return fn(x, t)
    return counted, calls


# --- registry and NFE --------------------------------------------------------------------------------------
def test_every_sampler_is_registered_once_with_its_nfe():
    assert set(NEW) <= set(SAMPLERS)
    for name, fn in SAMPLERS.items():
        assert fn.sampler_name == name and (fn.nfe_per_step is None or fn.nfe_per_step >= 1)
    assert (d.count_nfe("heun", 10), d.count_nfe("dpm_2", 10), d.count_nfe("dpmpp_sde", 10), d.count_nfe("lms", 10)) \
        == (19, 19, 19, 10)
    with pytest.raises(ValueError, match="return_nfe"):
        d.count_nfe("dpm_adaptive", 10)
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("euler")(lambda *a, **k: None)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_return_nfe_counts_the_model_calls(sampler):
    """return_nfe reports the calls actually made; for fixed-step samplers it is count_nfe's figure."""
    s = d.get_schedule("scaled_linear")
    fn, calls = counting(random_mixture(6, 3, seed=2).denoiser(s))
    x = d.prior_sample((3, 6), s, generator=0, dtype=torch.float64)
    out, nfe = d.sample(fn, x, s, sampler=sampler, steps=7, time_grid="karras", generator=[1, 2, 3], return_nfe=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert nfe == len(calls) > 0
    if SAMPLERS[sampler].nfe_per_step is not None:
        assert nfe == d.count_nfe(sampler, 7)


# --- convergence -------------------------------------------------------------------------------------------
# (sampler, options, order, schedule, grid, steps); measured slopes: lms 3.09, lms order 2 1.84, dpm_2 2.16 / 2.19,
# dpmpp_2m_sde(eta=0) 2.02, euler_ancestral(eta=0) 0.99
ODE_ORDERS = [("lms", {}, 3, "vp_linear", "log_snr", (20, 40)), ("lms", {"order": 2}, 2, "ve", "log_snr", (20, 40)),
              ("dpm_2", {}, 2, "cosine", "log_snr", (20, 40)), ("dpm_2", {}, 2, "ve", "karras", (20, 40)),
              ("dpmpp_2m_sde", {"eta": 0.0}, 2, "vp_linear", "log_snr", (20, 40)),
              ("euler_ancestral", {"eta": 0.0}, 1, "cosine", "log_snr", (40, 80))]


@pytest.mark.parametrize("sampler,opts,order,name,grid,steps", ODE_ORDERS)
def test_ode_samplers_converge_at_their_order(sampler, opts, order, name, grid, steps):
    s = d.get_schedule(name)
    x_T = d.prior_sample((32, 4), s, generator=0, dtype=torch.float64)
    exact = ode_solution(s, x_T)
    errs = [float((d.sample(GAUSS.denoiser(s), x_T, s, sampler=sampler, steps=n, time_grid=grid, **opts) - exact)
                  .abs().max()) for n in steps]
    assert errs[1] < 0.05
    assert math.log2(errs[0] / errs[1]) > order - 0.3


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
def test_dpm_adaptive_error_follows_its_tolerance(name):
    """Tighter rtol / atol: more model calls and a smaller error, the error within a few rtol."""
    s = d.get_schedule(name)
    x_T = d.prior_sample((16, 4), s, generator=0, dtype=torch.float64)
    exact = ode_solution(s, x_T)
    runs = [d.sample(GAUSS.denoiser(s), x_T, s, sampler="dpm_adaptive", time_grid="log_snr", return_nfe=True,
                     rtol=rtol, atol=rtol / 5) for rtol in (1e-2, 1e-3)]
    (x_lo, nfe_lo), (x_hi, nfe_hi) = runs
    err_lo, err_hi = float((x_lo - exact).abs().max()), float((x_hi - exact).abs().max())
    assert nfe_hi > nfe_lo and err_hi < err_lo / 3 and err_hi < 3e-3  # measured 1.2e-3 (ve), 5.7e-4 (vp)


def test_dpm_adaptive_calls_the_model_inside_the_grid_only():
    """Samples finish at different attempts; the finished ones ride along at valid levels, never past the grid's
    end (a Discrete table has no log-SNR beyond its first timestep) and never with non-finite inputs."""
    s = d.get_schedule("scaled_linear")
    fn = random_mixture(6, 3, seed=2).denoiser(s)
    ts = d.get_timesteps("karras", 10, s)
    seen = []

    def strict(x, t):
        assert torch.isfinite(x).all()
        seen.append(t.double())
        return fn(x, t)
    x = d.prior_sample((6, 6), s, generator=0, dtype=torch.float64)
    d.sample(strict, x, s, sampler="dpm_adaptive", timesteps=ts, rtol=0.01)
    t = torch.cat(seen)
    assert float(t.min()) >= float(ts[-2]) * (1 - 1e-6) and float(t.max()) <= float(ts[0])
    assert len({tuple(v.tolist()) for v in seen[1:]}) > 1 and any(len(set(v.tolist())) > 1 for v in seen)


def test_dpm_adaptive_rejects_a_pure_noise_start():
    s = d.get_schedule("rectified_flow")
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha > 0"):
        d.sample(GAUSS.denoiser(s), x, s, sampler="dpm_adaptive", time_grid="uniform")


# --- stochastic samplers ---------------------------------------------------------------------------------
def test_eta_zero_is_the_ode_solver_and_euler_ancestral_is_ddpm():
    """eta = 0: dpmpp_2m/3m_sde are dpmpp_2m/3m and euler_ancestral is Euler (no noise drawn); eta = 1 Euler ancestral
    is the DDPM posterior step in the scaled variable (same draws from the same generator)."""
    s = d.get_schedule("vp_linear")
    fn = random_mixture(6, 3, seed=1).denoiser(s)
    x = d.prior_sample((5, 6), s, generator=0, dtype=torch.float64)
    for sde, ode in [("dpmpp_2m_sde", "dpmpp_2m"), ("dpmpp_3m_sde", "dpmpp_3m"), ("euler_ancestral", "euler")]:
        a = d.sample(fn, x, s, sampler=sde, steps=9, time_grid="log_snr", eta=0.0, generator=0)
        b = d.sample(fn, x, s, sampler=ode, steps=9, time_grid="log_snr")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a = d.sample(fn, x, s, sampler="euler_ancestral", steps=9, generator=torch.Generator().manual_seed(4))
    b = d.sample(fn, x, s, sampler="ddpm", steps=9, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", SDE + ["euler_ancestral"])
def test_sde_samplers_keep_the_gaussian_marginal(sampler):
    """From the exact marginal at t = 1 of N(mu, c^2 I) data, the samples' mean and std approach mu and c."""
    s = d.get_schedule("vp_linear")
    t = torch.tensor(1.0, dtype=torch.float64)
    a, sg = s.alpha(t), s.sigma(t)
    z = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = a * MU + torch.sqrt(a ** 2 * C ** 2 + sg ** 2) * z
    steps = 100 if sampler == "euler_ancestral" else 30  # first order: its std is 0.45 at 50 steps
    x = d.sample(GAUSS.denoiser(s), x_T, s, sampler=sampler, steps=steps, time_grid="log_snr",
                 generator=torch.Generator().manual_seed(1))
    # measured std 0.483-0.525 (std error of the mean 0.009, of the std 0.007)
    torch.testing.assert_close(x.mean(0), MU[0], rtol=0, atol=0.04)
    torch.testing.assert_close(x.std(0), torch.full((4,), C, dtype=torch.float64), rtol=0, atol=0.04)


@pytest.mark.parametrize("sampler", SDE)
def test_brownian_noise_makes_the_sde_samplers_converge_per_seed(sampler):
    """One Brownian path per seed whatever the grid: the same seed at 2x steps gives a close sample, closer as steps
    grow; independent noise per step (noise='iid') gives an unrelated sample."""
    s = d.get_schedule("vp_linear")
    fn = random_mixture(8, 4, seed=0).denoiser(s)
    x_T = d.prior_sample((4, 8), s, generator=3, dtype=torch.float64)
    seeds = list(range(4))
    run = lambda n, noise="brownian": d.sample(fn, x_T, s, sampler=sampler, steps=n, time_grid="log_snr",  # noqa: E731
                                               generator=seeds, noise=noise)
    ref = run(160)
    rms = {n: float((run(n) - ref).pow(2).mean().sqrt()) for n in (20, 80)}
    iid = float((run(80, "iid") - ref).pow(2).mean().sqrt())
    # measured RMS to the 160-step sample at 20 -> 80 steps: dpmpp_sde 0.046 -> 0.013, 2m 0.021 -> 0.0045,
    # 3m 0.016 -> 0.0044; with iid noise at 80 steps 0.48-0.53
    assert rms[80] < 0.4 * rms[20] and rms[80] < 0.03 and iid > 10 * rms[80]


def test_brownian_increments_are_standard_normal_and_consistent():
    """z over [a, c] is the sum of the increments over [a, b] and [b, c]; each z is N(0, I)."""
    x = torch.zeros(4, 2000, dtype=torch.float64)
    noise = BrownianNoise(x, [torch.Generator().manual_seed(k) for k in range(4)])
    a, b, c = 0.9, 0.5, 0.2
    z_ac, z_ab, z_bc = noise(a, c), noise(a, b), noise(b, c)
    torch.testing.assert_close(z_ac * math.sqrt(a - c), z_ab * math.sqrt(a - b) + z_bc * math.sqrt(b - c),
                               rtol=1e-10, atol=1e-10)
    assert abs(float(z_ac.mean())) < 0.05 and abs(float(z_ac.std()) - 1) < 0.03
    with pytest.raises(ValueError, match="resolution"):
        noise(0.3, 0.3 + 1e-10)


@pytest.mark.parametrize("sampler,opts", [("euler_ancestral", {}),
                                          ("euler_ancestral", {"noise": "brownian", "eta": 0.5}),
                                          ("dpmpp_sde", {}), ("dpmpp_sde", {"noise": "iid", "s_noise": 0.9}),
                                          ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.7}),
                                          ("lms", {}), ("dpm_2", {}), ("dpm_adaptive", {})])
def test_sample_depends_on_seed_not_batch(sampler, opts):
    """Sample i's noise (and, for dpm_adaptive, its steps) come from its own generator only."""
    s = d.get_schedule("vp_linear")
    fn = random_mixture(6, 3, seed=2).denoiser(s)
    seeds = [10, 11, 12, 13]
    x4 = d.sample(fn, d.prior_sample((4, 6), s, seeds, dtype=torch.float64), s, sampler=sampler, steps=8,
                  generator=[100 + k for k in seeds], **opts)
    x2 = d.sample(fn, d.prior_sample((2, 6), s, seeds[2:], dtype=torch.float64), s, sampler=sampler, steps=8,
                  generator=[100 + k for k in seeds[2:]], **opts)
    torch.testing.assert_close(x4[2:], x2, rtol=1e-12, atol=1e-12)
    if sampler in STOCHASTIC:  # and the seed matters
        x_other = d.sample(fn, d.prior_sample((2, 6), s, seeds[2:], dtype=torch.float64), s, sampler=sampler, steps=8,
                           generator=[200 + k for k in seeds[2:]], **opts)
        assert not torch.allclose(x_other, x2)


def test_noise_options_are_checked():
    s = d.get_schedule("vp_linear")
    x = torch.zeros(2, 4, dtype=torch.float64)
    fn = GAUSS.denoiser(s)
    with pytest.raises(ValueError, match="brownian.*iid"):
        d.sample(fn, x, s, sampler="dpmpp_2m_sde", noise="pink")
    with pytest.raises(ValueError, match="eta"):
        d.sample(fn, x, s, sampler="euler_ancestral", eta=-1.0)
    with pytest.raises(ValueError, match="shape"):
        d.sample(fn, x, s, sampler="dpmpp_sde", steps=3, noise=lambda a, b: torch.zeros(3))
    with pytest.raises(ValueError, match="LMS order"):
        d.sample(fn, x, s, sampler="lms", order=0)
