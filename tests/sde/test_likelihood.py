"""PF-ODE likelihood against exact Gaussian / mixture log-densities; Hutchinson error bars."""
import math

import pytest
import torch

import sde
from diffusion.gmm import GaussianMixture
from diffusion.prediction import target

F64 = torch.float64
D = 4
GAUSS = GaussianMixture([[0.5, -1.0, 0.0, 2.0]], 0.7)
X = GAUSS.sample(48, torch.Generator().manual_seed(3))
EXACT = GAUSS.log_prob(X)


def _true_prior(s, g=GAUSS):
    """log p_T of the noised data, which the default N(0, prior_std^2) only approximates."""
    a, sg = (float(v) for v in s.marginal(s.t_max))
    return lambda z: g.log_prob(z, a, sg)


@pytest.mark.parametrize("name", ["vp", "sub_vp", "ve", "rectified_flow"])
def test_exact_divergence_likelihood(name):
    """log p_T(z) + int div = log p_0(x) to 1e-3 nats/dim with exact divergence (the prior as p_T)."""
    s = sde.get_sde(name)
    L = sde.log_likelihood(GAUSS.denoiser(s.schedule), X, s, divergence="exact", prior_logp=_true_prior(s))
    assert ((L.logp - EXACT) / D).abs().max() < 1e-3
    assert L.nfe > 10 and L.z.shape == X.shape
    torch.testing.assert_close(L.bpd, -L.logp / (D * math.log(2)))


def test_default_prior_for_standardised_data():
    """Zero-mean unit-variance data: p_T is the VP prior N(0, I) up to alpha_T^2 ~ 4e-5."""
    g = GaussianMixture([[0.0] * D], 1.0)
    x = g.sample(32, torch.Generator().manual_seed(0))
    s = sde.VPSDE()
    L = sde.log_likelihood(g.denoiser(s.schedule), x, s, divergence="exact")
    assert ((L.logp - g.log_prob(x)) / D).abs().max() < 1e-3


def test_hutchinson_on_gaussian_data():
    """For isotropic Gaussian data the PF-ODE Jacobian is c(t) I, so a Rademacher probe (v^T v = D) is
    exact and a Gaussian probe gives delta_logp * |v|^2 / D: unbiased, within its error bars."""
    s = sde.VPSDE()
    m = GAUSS.denoiser(s.schedule)
    exact = sde.log_likelihood(m, X, s, divergence="exact", prior_logp=_true_prior(s))
    rad = sde.log_likelihood(m, X, s, probe="rademacher", generator=0, prior_logp=_true_prior(s))
    torch.testing.assert_close(rad.logp, exact.logp, atol=1e-6, rtol=0)
    gen = list(range(100, 100 + len(X)))
    gau = sde.log_likelihood(m, X, s, probe="gaussian", generator=gen, prior_logp=_true_prior(s))
    v2 = sde.probes(X, "gaussian", 1, gen)[0].pow(2).sum(1)
    torch.testing.assert_close(gau.delta_logp, exact.delta_logp * v2 / D, atol=1e-4, rtol=1e-4)
    err = gau.logp - EXACT
    assert err.std() > 0.1 and err.mean().abs() < 4 * err.std() / math.sqrt(len(X))


def test_hutchinson_error_bars_on_a_mixture():
    """Anisotropic Jacobian (2-component mixture): Rademacher and Gaussian estimates scatter around the
    exact-divergence value and their mean lies within 4 standard errors of it."""
    g = GaussianMixture([[1.0, 0.0, -0.5], [-1.0, 0.5, 0.5]], [0.3, 0.5])
    x = g.sample(64, torch.Generator().manual_seed(1))
    s = sde.VPSDE()
    m = g.denoiser(s.schedule)
    exact = sde.log_likelihood(m, x, s, divergence="exact", prior_logp=_true_prior(s, g))
    assert ((exact.logp - g.log_prob(x)) / 3).abs().max() < 1e-3
    for probe in ("rademacher", "gaussian"):
        est = sde.log_likelihood(m, x, s, probe=probe, generator=7, n_probes=2, prior_logp=_true_prior(s, g))
        err = est.logp - exact.logp
        assert err.std() > 1e-3  # it is an estimate
        assert err.mean().abs() < 4 * err.std() / math.sqrt(len(x))


def test_divergence_estimators_on_a_linear_map():
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    fx = x @ a.T
    torch.testing.assert_close(sde.divergence_exact(fx, x), torch.full((3,), float(a.trace()), dtype=F64))
    v = sde.probes(x.detach(), "rademacher", 4000, generator=0)
    est = sde.divergence_hutchinson(fx, x, v)
    off = a - torch.diag(a.diagonal())
    se = math.sqrt(2 * float((off ** 2).sum()) / 4000)  # Rademacher variance 2 sum_{i != j} a_ij^2
    assert torch.all((est - a.trace()).abs() < 4 * se)


def test_prediction_kinds_and_scipy_nfe():
    s = sde.SDE(sde.get_sde("rectified_flow").schedule)
    exact = GAUSS.denoiser(s.schedule)

    def raw(x, t):
        return target("velocity", *exact(x, t), t, s.schedule)
    ref = sde.log_likelihood(exact, X[:8], s, generator=0)
    got = sde.log_likelihood(raw, X[:8], s, generator=0, prediction="velocity")
    torch.testing.assert_close(got.logp, ref.logp)
    scipy = sde.log_likelihood(exact, X[:8], s, generator=0, method="RK45")
    torch.testing.assert_close(scipy.logp, ref.logp, atol=1e-4, rtol=0)
    assert ref.nfe <= scipy.nfe


def test_bits_per_dim_and_dequantization():
    """score-SDE's offsets: 7 bits for data scaled to [-1, 1], 8 for [0, 1] (7 - inverse_scaler(-1))."""
    logp = torch.tensor([-100.0, 50.0])
    base = -logp / (10 * math.log(2))
    torch.testing.assert_close(sde.bits_per_dim(logp, 10, image_scale=2.0), base + 7)
    torch.testing.assert_close(sde.bits_per_dim(logp, 10, image_scale=1.0), base + 8)
    img = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    deq = sde.dequantize(img, generator=[0, 1, 2, 3])
    k = img.float()
    assert deq.dtype == torch.float32 and torch.all(deq >= k / 256) and torch.all(deq < (k + 1) / 256)
    torch.testing.assert_close(deq[2:], sde.dequantize(img[2:], generator=[2, 3]))
    # a density uniform on each bin of a 256-level grid: bpd = 8 exactly (log p_x = 0 on [0, 1]^D)
    torch.testing.assert_close(sde.bits_per_dim(torch.zeros(1), 12, image_scale=1.0), torch.tensor([8.0]))
    with pytest.raises(ValueError, match="integer pixel values"):
        sde.dequantize(torch.tensor([[0.5]]))


def test_bad_input():
    s = sde.VPSDE()
    m = GAUSS.denoiser(s.schedule)
    with pytest.raises(ValueError, match=r"unknown divergence 'trace'; valid: \['exact', 'hutchinson'\]"):
        sde.log_likelihood(m, X, s, divergence="trace")
    with pytest.raises(ValueError, match=r"unknown probe 'uniform'; valid"):
        sde.log_likelihood(m, X, s, probe="uniform")
    with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\)"):
        sde.log_likelihood(m, X, s, eps=0.0)
    with pytest.raises(ValueError, match="n_probes"):
        sde.log_likelihood(m, X, s, n_probes=0)
    with pytest.raises(ValueError, match="finite floating-point"):
        sde.log_likelihood(m, X * float("nan"), s)
    with pytest.raises(ValueError, match="rtol"):
        sde.log_likelihood(m, X, s, rtol=0)
