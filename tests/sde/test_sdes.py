"""SDE coefficients against the schedule's marginals and score-SDE's closed forms."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import sde
from diffusion.gmm import GaussianMixture
from diffusion.prediction import target
from diffusion.schedule import VE, Cosine, Discrete, RectifiedFlow, VPLinear

F64 = torch.float64
ALL = {
    "vp": lambda: sde.VPSDE(), "sub_vp": lambda: sde.SubVPSDE(), "ve": lambda: sde.VESDE(),
    "rf": lambda: sde.get_sde("rectified_flow"), "cosine": lambda: sde.get_sde("cosine"),
    "discrete": lambda: sde.SDE(Discrete("linear")),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_marginals_solve_the_moment_odes(name):
    """dm/dt = f m, dv/dt = 2 f v + g^2 integrated numerically reproduce (alpha, sigma^2)."""
    s = ALL[name]()
    # a DDPM table is piecewise (kinks at its 1000 knots): integrate it across a few knots only
    t0, ts = (0.3, np.array([0.305, 0.312, 0.32])) if name == "discrete" else (1e-4, np.array([0.05, 0.3, 0.7, s.t_max]))
    a0, s0 = (float(v) for v in s.marginal(t0))

    def rhs(t, y):
        f, g2 = (float(v) for v in s.coefficients(t))
        return [f * y[0], 2 * f * y[1] + g2]
    sol = solve_ivp(rhs, (t0, ts[-1]), [a0, s0 ** 2], t_eval=ts, rtol=1e-10, atol=1e-12, method="DOP853")
    alpha, sigma = s.marginal(torch.tensor(ts, dtype=F64))
    np.testing.assert_allclose(sol.y[0], alpha.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(sol.y[1]), sigma.numpy(), rtol=1e-5)


def test_score_sde_closed_forms():
    """VP f = -beta/2, g^2 = beta; sub-VP sigma = 1 - alpha^2, g^2 = beta (1 - alpha^4); VE g = smin r^t sqrt(2 ln r)."""
    t = torch.linspace(0.01, 1, 50, dtype=F64)
    beta = 0.1 + t * (20 - 0.1)
    vp, sub, ve = sde.VPSDE(), sde.SubVPSDE(), sde.VESDE()
    f, g2 = vp.coefficients(t)
    torch.testing.assert_close(f, -beta / 2)
    torch.testing.assert_close(g2, beta)
    alpha = vp.marginal(t)[0]
    torch.testing.assert_close(sub.marginal(t)[0], alpha)
    torch.testing.assert_close(sub.marginal(t)[1], 1 - alpha ** 2)
    f, g2 = sub.coefficients(t)
    torch.testing.assert_close(f, -beta / 2)
    torch.testing.assert_close(g2, beta * (1 - alpha ** 4))
    r = 50 / 0.01
    torch.testing.assert_close(ve.diffusion(t), 0.01 * r ** t * math.sqrt(2 * math.log(r)))
    assert torch.all(ve.f(t) == 0)
    assert ve.prior_std == pytest.approx(50.0, rel=1e-3) and vp.prior_std == pytest.approx(1.0)
    assert (vp.kind, sub.kind, ve.kind) == ("vp", "sub_vp", "ve")
    assert (vp.eps, ve.eps) == (1e-3, 1e-5)


def test_rectified_flow_sde():
    """alpha = 1 - t: f = -1/(1-t), g^2 = 2t/(1-t); t_max moves off t = 1 where alpha = 0."""
    s = sde.SDE(RectifiedFlow())
    t = torch.linspace(0.01, 0.99, 20, dtype=F64)
    f, g2 = s.coefficients(t)
    torch.testing.assert_close(f, -1 / (1 - t))
    torch.testing.assert_close(g2, 2 * t / (1 - t))
    assert s.t_max == pytest.approx(1 - 1e-3)
    with pytest.raises(ValueError, match="not finite at t_max"):
        sde.SDE(RectifiedFlow(), t_max=1.0)


def test_subvp_log_snr_round_trip_and_base_check():
    for base in (VPLinear(), Cosine(), Discrete("linear")):
        sub = sde.SubVP(base)
        t = torch.linspace(0.02, 0.95, 30, dtype=F64)
        torch.testing.assert_close(sub.t_from_log_snr(sub.log_snr(t)), t, atol=1e-6, rtol=1e-6)
        assert torch.all(sub.sigma(t) < base.sigma(t))  # sub-VP variance is below VP's
    with pytest.raises(ValueError, match="variance-preserving"):
        sde.SubVP(VE())


def test_transition_is_the_ddpm_step():
    """On a DDPM table the exact kernel between adjacent timesteps is x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) z."""
    sch = Discrete("linear")
    s = sde.SDE(sch)
    betas = 1 - sch.alphas_cumprod[1:] / sch.alphas_cumprod[:-1]
    for n in (1, 10, 500, 999):
        a, G2 = s.transition(float(sch.t_from_timestep(n)), float(sch.t_from_timestep(n - 1)))
        assert a == pytest.approx(math.sqrt(1 - betas[n - 1]), rel=1e-10)
        assert G2 == pytest.approx(float(betas[n - 1]), rel=1e-8)


def test_prior():
    s = sde.VESDE()
    z = s.prior_sample((5, 3, 2), generator=0, dtype=F64)
    assert z.shape == (5, 3, 2)
    ref = torch.distributions.Normal(0.0, s.prior_std).log_prob(z).sum((1, 2))
    torch.testing.assert_close(s.prior_logp(z), ref)
    # per-sample seeds: sample i does not depend on the batch
    torch.testing.assert_close(s.prior_sample((4, 3), generator=[7, 8, 9, 10])[2:], s.prior_sample((2, 3), generator=[9, 10]))


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "velocity", "score"])
@pytest.mark.parametrize("name", ["vp", "rf"])
def test_reverse_drift_is_prediction_independent(kind, name):
    """A raw model of any prediction kind gives the same score, reverse drift and PF drift."""
    s = ALL[name]()
    g = GaussianMixture([[0.3, -0.2, 0.5]], 0.6)
    exact = g.denoiser(s.schedule)

    def raw(x, t):
        x0, eps = exact(x, t)
        return target(kind, x0, eps, t, s.schedule)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = 0.37
    for pf in (False, True):
        ref, got = s.reverse(exact, probability_flow=pf), s.reverse(raw, prediction=kind, probability_flow=pf)
        torch.testing.assert_close(got.drift(x, t), ref.drift(x, t))
    tt = torch.full((6,), t, dtype=F64)
    torch.testing.assert_close(ref.score(x, t), g.score(x, tt, s.schedule))
    assert ref.diffusion(t) == 0.0 and s.reverse(exact).diffusion(t) == pytest.approx(float(s.diffusion(t)))


def test_names_and_bad_input():
    assert sde.get_sde("subvp").kind == "sub_vp" and sde.get_sde("cosine").kind == "vp"
    with pytest.raises(ValueError, match="unknown SDE 'vpp'.*valid:.*sub_vp"):
        sde.get_sde("vpp")
    for eps in (0.0, 1.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="eps must lie in"):
            sde.VPSDE(eps=eps)
    with pytest.raises(ValueError, match="smaller than t_max"):
        sde.VPSDE(t_max=0.5, eps=0.6)
    with pytest.raises(ValueError, match="expected an sde.SDE"):
        sde.as_sde(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reverse_sde_hands_the_model_a_float32_time_for_half_states(dtype):
    """A half-precision state must not round the time the network sees (bf16: t = 0.999 -> 1.0)."""
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x), torch.zeros_like(x)

    rsde = sde.ReverseSDE(sde.SDE(Discrete("scaled_linear")), model_fn)
    rsde.denoise(torch.zeros(2, 3, dtype=dtype), 0.999)
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == [pytest.approx(0.999, abs=1e-7)] * 2
