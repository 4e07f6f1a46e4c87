"""Score-SDE samplers on Gaussian data, where the score is exact: moments, closed-form PF-ODE,
parity with diffusion's DDPM sampler, seed determinism and bad input."""
import math

import pytest
import torch

import diffusion
import sde
from diffusion.gmm import GaussianMixture, random_mixture
from diffusion.prediction import target
from diffusion.schedule import Discrete

F64 = torch.float64
MU, STD = [1.0, -0.5], 0.5
GAUSS = GaussianMixture([MU], STD)


def _moments_ok(x, n_sigma=4.0, bias=0.02):
    """Mean and covariance of x match N(MU, STD^2 I) within n_sigma standard errors (+ a discretisation
    allowance of `bias` relative on the variance)."""
    n = x.shape[0]
    mean_se = STD / math.sqrt(n)
    assert torch.all((x.mean(0) - torch.tensor(MU, dtype=F64)).abs() < n_sigma * mean_se), x.mean(0)
    cov = torch.cov(x.T)
    var_se = STD ** 2 * math.sqrt(2 / n)
    assert torch.all((cov.diagonal() - STD ** 2).abs() < n_sigma * var_se + bias * STD ** 2), cov
    assert abs(float(cov[0, 1])) < n_sigma * STD ** 2 / math.sqrt(n), cov


@pytest.mark.parametrize("name,sampler", [("vp", "pc"), ("vp", "euler_maruyama"), ("ve", "pc"),
                                          ("sub_vp", "reverse_diffusion"), ("rectified_flow", "euler_maruyama"),
                                          ("vp", "ancestral")])
def test_sde_samplers_reproduce_gaussian_moments(name, sampler):
    s = sde.get_sde(name)
    x_T = s.prior_sample((4000, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    x, nfe = sde.sample(GAUSS.denoiser(s.schedule), x_T, s, sampler=sampler, steps=1000,
                        generator=torch.Generator().manual_seed(1), return_nfe=True)
    assert nfe == sde.count_nfe(sampler, 1000) == (2000 if sampler == "pc" else 1000)
    _moments_ok(x)


@pytest.mark.parametrize("corrector", [sde.langevin_corrector, sde.annealed_langevin_corrector])
def test_langevin_corrector_targets_p_t(corrector):
    """At a fixed time the corrector is Langevin MCMC on p_t = N(alpha mu, (alpha^2 s^2 + sigma^2) I)."""
    s = sde.VESDE()
    t = 0.5
    a, sg = (float(v) for v in s.marginal(t))
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    x, _ = corrector(s.reverse(GAUSS.denoiser(s.schedule)), x, t, t, 0.16, 200, torch.Generator().manual_seed(1))
    var = a ** 2 * STD ** 2 + sg ** 2
    assert torch.all((x.mean(0) - a * torch.tensor(MU, dtype=F64)).abs() < 5 * math.sqrt(var / 2000))
    assert torch.all((x.var(0) / var - 1).abs() < 0.1)  # sampling error + the O(step) bias of unadjusted Langevin


@pytest.mark.parametrize("name", ["vp", "sub_vp", "ve", "rectified_flow"])
def test_pf_ode_matches_closed_form(name):
    """For N(mu, s^2 I) data the PF-ODE flow is affine: x_t = alpha_t mu + r_t / r_T (x_T - alpha_T mu),
    r_t = sqrt(alpha_t^2 s^2 + sigma_t^2); the sampler returns E[x0 | x_eps] of that x_eps."""
    s = sde.get_sde(name)
    x_T = s.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    x, nfe = sde.sample(GAUSS.denoiser(s.schedule), x_T, s, sampler="ode", return_nfe=True)
    mu = torch.tensor(MU, dtype=F64)
    (aT, sT), (ae, se) = ((float(v) for v in s.marginal(t)) for t in (s.t_max, s.eps))
    r = lambda a, sg: math.sqrt(a ** 2 * STD ** 2 + sg ** 2)  # noqa: E731
    x_eps = ae * mu + r(ae, se) / r(aT, sT) * (x_T - aT * mu)
    x0 = mu + ae * STD ** 2 / r(ae, se) ** 2 * (x_eps - ae * mu)
    torch.testing.assert_close(x, x0, atol=2e-4, rtol=0)
    # same Dormand-Prince algorithm and step control as scipy's RK45: never more evaluations
    _, nfe_scipy = sde.sample(GAUSS.denoiser(s.schedule), x_T, s, sampler="ode", method="RK45", return_nfe=True)
    assert 10 < nfe <= nfe_scipy


def test_ode_torchdiffeq_and_options():
    s = sde.VPSDE()
    x_T = s.prior_sample((8, 2), generator=0, dtype=F64)
    m = GAUSS.denoiser(s.schedule)
    ref = sde.sample(m, x_T, s, sampler="ode", rtol=1e-7, atol=1e-7)
    x, nfe = sde.sample(m, x_T, s, sampler="ode", method="torchdiffeq_dopri5", return_nfe=True)
    torch.testing.assert_close(x, ref, atol=1e-3, rtol=0)
    seen = []
    x_eps = sde.sample(m, x_T, s, sampler="ode", denoise=False, callback=seen.append)
    assert len(seen) == sde.sample(m, x_T, s, sampler="ode", denoise=False, return_nfe=True)[1]
    assert {"i", "t", "x", "x0", "x_mean", "nfe"} <= set(seen[0]) and seen[0]["t"] == s.t_max
    assert seen[0]["x0"].shape == x_T.shape
    assert not torch.allclose(x_eps, ref)


def test_ancestral_predictor_is_sample_ddpm():
    """On a DDPM table grid the ancestral predictor with posterior variance IS diffusion's sample_ddpm
    (Ho et al. Alg. 2 with beta-tilde): mean (x + G^2 score)/a = posterior mean, same noise draws."""
    sch = Discrete("linear")
    ts = diffusion.get_timesteps("trailing", 50, sch)
    m = GAUSS.denoiser(sch)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = diffusion.sample(m, x_T, sch, sampler="ddpm", timesteps=ts, generator=list(range(16)))
    got, nfe = sde.sample(m, x_T, sch, sampler="ancestral", timesteps=ts, generator=list(range(16)), return_nfe=True)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    assert nfe == 50


def test_reverse_diffusion_is_ddpm_to_first_order():
    """score-SDE's reverse-diffusion step x_mean = (2 - a) x + beta score (a = sqrt(1 - beta_n)) vs the
    ancestral / DDPM mean (x + beta score) / a: they differ by -(1 - a)^2 / a x - (1/a - 1) beta score,
    O(beta^2); with variance='beta' the noise std is sqrt(beta) in both (DDPM's sigma^2 = beta)."""
    sch = Discrete("linear")
    s = sde.SDE(sch)
    rs = s.reverse(GAUSS.denoiser(sch))
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 1.3
    for n in (1, 100, 400, 700, 999):
        t_i, t_j = float(sch.t_from_timestep(n)), float(sch.t_from_timestep(n - 1))
        beta = 1 - float(sch.alphas_cumprod[n] / sch.alphas_cumprod[n - 1])
        a = math.sqrt(1 - beta)
        _, rd = sde.reverse_diffusion_step(rs, x, t_i, t_j)
        _, anc = sde.ancestral_step(rs, x, t_i, t_j)
        score = rs.score(x, t_i)
        torch.testing.assert_close(rd - anc, -(1 - a) ** 2 / a * x - (1 / a - 1) * beta * score)
        assert torch.all((rd - anc).abs() <= beta ** 2 * (x.abs() + score.abs()))  # the stated tolerance
        g = [torch.Generator().manual_seed(5)]
        noise_rd = sde.reverse_diffusion_step(rs, x[:1], t_i, t_j, g)[0] - rd[:1]
        g = [torch.Generator().manual_seed(5)]
        noise_anc = sde.ancestral_step(rs, x[:1], t_i, t_j, g, variance="beta")[0] - anc[:1]
        torch.testing.assert_close(noise_rd, noise_anc)


@pytest.mark.parametrize("kind,name", [("eps", "vp"), ("score", "ve"), ("velocity", "rectified_flow"), ("v", "sub_vp")])
def test_any_prediction_kind_samples_the_same(kind, name):
    """DDPM- (eps), score-, RF- (velocity) and v-trained models, given raw with prediction=."""
    s = sde.get_sde(name)
    exact = GAUSS.denoiser(s.schedule)

    def raw(x, t):
        return target(kind, *exact(x, t), t, s.schedule)
    x_T = s.prior_sample((8, 2), generator=0, dtype=F64)
    for sampler in ("pc", "ode"):
        ref = sde.sample(exact, x_T, s, sampler=sampler, steps=20, generator=3)
        got = sde.sample(raw, x_T, s, sampler=sampler, steps=20, generator=3, prediction=kind)
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "ancestral", "annealed_langevin"])
def test_per_sample_generators(sampler):
    """A list of generators: each sample depends on its own seed, not on the batch (pc: norm='sample')."""
    mix = random_mixture(16, 4, seed=0)
    s = sde.VPSDE()
    m = mix.denoiser(s.schedule)
    x_T = s.prior_sample((4, 16), generator=[10, 11, 12, 13], dtype=F64)
    big = sde.sample(m, x_T, s, sampler=sampler, steps=30, generator=[0, 1, 2, 3])
    small = sde.sample(m, x_T[2:], s, sampler=sampler, steps=30, generator=[2, 3])
    torch.testing.assert_close(big[2:], small)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("sampler", sorted(set(sde.SAMPLERS) - {"ode"}))
def test_nfe_and_grid(sampler):
    s = sde.VESDE()
    x_T = s.prior_sample((4, 2), generator=0, dtype=F64)
    seen = []
    x, nfe = sde.sample(GAUSS.denoiser(s.schedule), x_T, s, sampler=sampler, steps=12, n_steps=2, generator=1,
                        return_nfe=True, callback=seen.append)
    assert nfe == sde.count_nfe(sampler, 12, n_steps=2) and torch.isfinite(x).all()
    assert seen[0]["t"] == s.t_max and seen[-1]["t"] == pytest.approx(s.eps)
    ts = sde.get_time_grid(s, 12)
    assert len(ts) == 13 and ts[0] == s.t_max and ts[-2] == pytest.approx(1e-5) and ts[-1] == 0


def test_bad_input():
    s = sde.VPSDE()
    m = GAUSS.denoiser(s.schedule)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"unknown sampler 'pcc'; valid: \['ancestral'"):
        sde.sample(m, x, s, sampler="pcc")
    for snr in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="snr must be a finite number > 0"):
            sde.sample(m, x, s, sampler="pc", snr=snr)
    for eps in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\)"):
            sde.sample(m, x, s, sampler="pc", eps=eps)
        with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\)"):
            sde.sample(m, x, s, sampler="ode", eps=eps)
    with pytest.raises(ValueError, match="unknown predictor 'heun'; valid"):
        sde.sample(m, x, s, sampler="pc", predictor="heun")
    with pytest.raises(ValueError, match="unknown ode method 'rk4'; valid"):
        sde.sample(m, x, s, sampler="ode", method="rk4")
    with pytest.raises(ValueError, match="n_steps"):
        sde.sample(m, x, s, sampler="langevin", n_steps=0)
    with pytest.raises(ValueError, match="unexpected options"):
        sde.sample(m, x, s, sampler="pc", eta=1.0)
    with pytest.raises(ValueError, match="unknown SDE"):
        sde.sample(m, x, "vpp")
    with pytest.raises(ValueError, match="x_T must be a finite tensor"):
        sde.sample(m, x * float("nan"), s)

    def nan_model(x, t):
        return x * float("nan"), x
    for sampler in ("pc", "ode", "euler_maruyama"):
        with pytest.raises(FloatingPointError, match="not finite"):
            sde.sample(nan_model, x, s, sampler=sampler, steps=5)
