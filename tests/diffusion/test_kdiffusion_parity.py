"""The k-diffusion family against diffusers' schedulers and against k-diffusion's sigma-space formulation.

diffusers: each scheduler runs its own loop (scale_model_input -> net -> step) on the 'trailing' grid of the SD
table, our sampler runs diffusion.sample(time_grid="trailing") from the same start, with the same noise; results agree
to 1e-5 of their scale (diffusers computes in float32):
- EulerAncestralDiscreteScheduler, LMSDiscreteScheduler, KDPM2DiscreteScheduler: same algorithm (eta = 1 for
  the ancestral step; LMS order 4; DPM-Solver-2 with its midpoint sqrt(sigma_i sigma_{i+1})); Euler ancestral draws
  its noise from the same torch.Generator in the same order.
- DPMSolverSDEScheduler (k-diffusion's dpmpp_sde, eta = 1, r = 1/2) and DPMSolverMultistepScheduler(algorithm_type=
  "sde-dpmsolver++", solver_order=2, midpoint): same algorithm; the noise is fed to both sides (ours through
  noise=callable, diffusers through its noise_sampler / step(variance_noise=)). Their default noise differs by
  design: diffusers' Brownian tree runs in sigma over the grid's [sigma_min, sigma_max] (one path per grid), ours
  in t over [0, 1] (one path per seed whatever the grid; also defined where alpha = 0).
- Between table entries (the midpoints of KDPM2 / DPMSolverSDE) diffusers hands the network a timestep interpolated
  linearly in log sigma; the network of these tests reads that timestep on our side too (a time signal, not part of
  the algorithm).
Not compared: diffusers' third-order sde-dpmsolver++ weights D2 by (1 - e^{-2h} - 2h) / (2h)^2 - 0.5, which tends to
-1 as h -> 0 instead of 0 (the ODE weight's -0.5 carried over with the wrong sign), so its 3M-SDE is not the
third-order method; ours (k-diffusion's weights) reduces to dpmpp_3m at eta = 0 (test_sampler_catalogue).

k-diffusion: its samplers work on x~ = x / alpha with a denoiser D(x~, sigma); below they are restated in that
variable and run with an exact Gaussian-mixture denoiser written in sigma space, while ours run on a VP schedule
through wrap_kdiffusion(D) -- covering eta, s_noise and the samplers diffusers lacks.
"""
import math

import numpy as np
import pytest
import torch

import diffusion as d
from diffusion.gmm import random_mixture
from tests.diffusion.test_diffusers_parity import TABLE, euler_start, net, x_T

diffusers = pytest.importorskip("diffusers")
# diffusers' _sigma_to_t on numpy 2 (KDPM2, DPMSolverSDE): one warning per call
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
for _name in ("EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
              "DPMSolverSDEScheduler", "DPMSolverMultistepScheduler"):
    getattr(diffusers, _name)


@pytest.fixture(scope="module")
def schedule():
    return d.Discrete("scaled_linear")


def assert_parity(a, b):
    """Agreement to 1e-5 of the result's scale: diffusers steps in float32, and with this test network (not a
    denoiser) eps-prediction states grow to ~30, so an entry near 0 carries float32 rounding of ~1e-6 to 2e-5.
    Measured max |ours - diffusers| / max |x|: 1e-8 .. 8e-7."""
    assert torch.isfinite(a).all() and a.abs().max() > 0.1
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def log_sigma_timestep(schedule):
    """The (fractional) training timestep diffusers hands the network at EDM sigma: linear in log sigma between
    table entries (its _sigma_to_t); at table sigmas it is the integer timestep."""
    log_sigmas = np.log(((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt().numpy())
    index = np.arange(len(log_sigmas), dtype=np.float64)

    def timestep(t):
        sig = schedule.edm_sigma(t.double()).numpy()
        return torch.from_numpy(np.interp(np.log(sig), log_sigmas, index))
    return timestep


def ours(schedule, sampler, steps, prediction="eps", x_start=None, **opts):
    model = lambda x, t: net(x, log_sigma_timestep(schedule)(t))  # noqa: E731
    return d.sample(model, x_T() if x_start is None else x_start, schedule, sampler=sampler, steps=steps,
                    prediction=prediction, time_grid="trailing", **opts)


def theirs(sch, steps, start, noise_sampler=None, generator=None, variance_noise=None):
    """diffusers' loop; noise_sampler replaces DPMSolverSDEScheduler's Brownian tree, variance_noise(k) feeds step k."""
    sch.set_timesteps(steps)
    if noise_sampler is not None:
        sch.noise_sampler = noise_sampler
    x = start.clone()
    for k, ts in enumerate(sch.timesteps):
        kw = {"generator": generator} if generator is not None else {}
        if variance_noise is not None:
            kw["variance_noise"] = variance_noise(k)
        x = sch.step(net(sch.scale_model_input(x, ts), ts), ts, x, **kw).prev_sample
    return x.double()


class Recorded:
    """noise(t_from, t_to) for our sampler: standard normal draws, kept to replay to diffusers in call order."""

    def __init__(self, seed):
        self.g, self.draws = torch.Generator().manual_seed(seed), []

    def __call__(self, t_from, t_to):
        self.draws.append(torch.randn(x_T().shape, generator=self.g, dtype=torch.float64))
        return self.draws[-1]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 20])
def test_euler_ancestral(schedule, steps, prediction):
    sch = diffusers.EulerAncestralDiscreteScheduler(**TABLE, timestep_spacing="trailing", prediction_type=prediction)
    start = euler_start(sch, schedule)
    b = theirs(sch, steps, x_T() * float(sch.init_noise_sigma), generator=torch.Generator().manual_seed(3))
    kind = "eps" if prediction == "epsilon" else "v"
    a = ours(schedule, "euler_ancestral", steps, kind, start, generator=torch.Generator().manual_seed(3))
    assert_parity(a, b)


@pytest.mark.parametrize("steps", [4, 12, 30])
def test_lms(schedule, steps):
    sch = diffusers.LMSDiscreteScheduler(**TABLE, timestep_spacing="trailing")
    b = theirs(sch, steps, x_T() * float(sch.init_noise_sigma))
    assert_parity(ours(schedule, "lms", steps, x_start=euler_start(sch, schedule)), b)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [3, 10])
def test_dpm_2(schedule, steps, prediction):
    sch = diffusers.KDPM2DiscreteScheduler(**TABLE, timestep_spacing="trailing", prediction_type=prediction)
    b = theirs(sch, steps, x_T() * float(sch.init_noise_sigma))
    kind = "eps" if prediction == "epsilon" else "v"
    assert_parity(ours(schedule, "dpm_2", steps, kind, euler_start(sch, schedule)), b)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [3, 10])
def test_dpmpp_sde(schedule, steps, prediction):
    sch = diffusers.DPMSolverSDEScheduler(**TABLE, timestep_spacing="trailing", prediction_type=prediction)
    noise = Recorded(5)
    kind = "eps" if prediction == "epsilon" else "v"
    a = ours(schedule, "dpmpp_sde", steps, kind, euler_start(sch, schedule), noise=noise)
    assert len(noise.draws) == 2 * (steps - 1)  # to the midpoint and over the step; none on the last step
    replay = list(noise.draws)
    b = theirs(sch, steps, x_T() * float(sch.init_noise_sigma), noise_sampler=lambda s0, s1: replay.pop(0))
    assert not replay
    assert_parity(a, b)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [4, 10, 20])
def test_dpmpp_2m_sde(schedule, steps, prediction):
    sch = diffusers.DPMSolverMultistepScheduler(**TABLE, algorithm_type="sde-dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero", timestep_spacing="trailing",
                                                prediction_type=prediction)
    noise = Recorded(6)
    kind = "eps" if prediction == "epsilon" else "v"
    a = ours(schedule, "dpmpp_2m_sde", steps, kind, noise=noise)
    assert len(noise.draws) == steps - 1
    zero = torch.zeros(x_T().shape, dtype=torch.float64)  # the last step (to sigma = 0) scales its noise by 0
    b = theirs(sch, steps, x_T(), variance_noise=lambda k: noise.draws[k] if k < steps - 1 else zero)
    assert_parity(a, b)


# --- k-diffusion's formulation: x~ = x / alpha, denoiser D(x~, sigma) ------------------------------------------
def ancestral_split(s_from, s_to, eta):
    up = min(s_to, eta * math.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2))
    return math.sqrt(s_to ** 2 - up ** 2), up


def ref_euler_ancestral(D, x, sig, noise, eta, s_noise):
    for i in range(len(sig) - 1):
        den = D(x, sig[i])
        down, up = ancestral_split(sig[i], sig[i + 1], eta)
        x = x + (x - den) / sig[i] * (down - sig[i])
        if sig[i + 1] > 0:
            x = x + noise(i, 0) * s_noise * up
    return x


def ref_dpmpp_sde(D, x, sig, noise, eta, s_noise, r=0.5):
    for i in range(len(sig) - 1):
        den = D(x, sig[i])
        if sig[i + 1] == 0:
            x = den
            continue
        lam, lam_next = -math.log(sig[i]), -math.log(sig[i + 1])
        s = lam + r * (lam_next - lam)
        down, up = ancestral_split(sig[i], math.exp(-s), eta)
        x_2 = down / sig[i] * x + (1 - down / sig[i]) * den + noise(i, 0) * s_noise * up
        den_d = (1 - 1 / (2 * r)) * den + 1 / (2 * r) * D(x_2, math.exp(-s))
        down, up = ancestral_split(sig[i], sig[i + 1], eta)
        x = down / sig[i] * x + (1 - down / sig[i]) * den_d + noise(i, 1) * s_noise * up
    return x


def ref_dpmpp_msde(D, x, sig, noise, eta, s_noise, order):
    """DPM-Solver++(2M / 3M) SDE in x~ with the order schedule of dpmpp_2m / dpmpp_3m (warm-up; on grids shorter
    than 15 steps the last-but-one step at most second order; the last step, to sigma = 0, first order)."""
    n, hist = len(sig) - 1, []  # (den, lambda), newest last
    for i in range(n):
        den = D(x, sig[i])
        if sig[i + 1] == 0:
            x = den
            continue
        lam, h = -math.log(sig[i]), math.log(sig[i] / sig[i + 1])
        he = (1 + eta) * h
        k = min(order, len(hist) + 1, 2 if (n < 15 and i == n - 2) else order)
        x = sig[i + 1] / sig[i] * math.exp(-eta * h) * x - math.expm1(-he) * den
        if k == 2:  # midpoint: + (1 - e^{-he}) / 2 * (den - den_1) / r0
            x = x - 0.5 * math.expm1(-he) * (den - hist[-1][0]) * h / (lam - hist[-1][1])
        elif k == 3:
            r0, r1 = (lam - hist[-1][1]) / h, (hist[-1][1] - hist[-2][1]) / h
            d1_0, d1_1 = (den - hist[-1][0]) / r0, (hist[-1][0] - hist[-2][0]) / r1
            d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
            phi_2 = math.expm1(-he) / he + 1
            x = x + phi_2 * d1 - (phi_2 / he - 0.5) * d2
        x = x + noise(i, 0) * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        hist = (hist + [(den, lam)])[-2:]
    return x


def ref_dpm_2(D, x, sig, noise, eta, s_noise):
    for i in range(len(sig) - 1):
        den = D(x, sig[i])
        dx = (x - den) / sig[i]
        if sig[i + 1] == 0:
            x = x + dx * (sig[i + 1] - sig[i])
            continue
        mid = math.sqrt(sig[i] * sig[i + 1])
        x_2 = x + dx * (mid - sig[i])
        x = x + (x_2 - D(x_2, mid)) / mid * (sig[i + 1] - sig[i])
    return x


def ref_lms(D, x, sig, noise, eta, s_noise, order=4):
    from scipy import integrate
    ds = []
    for i in range(len(sig) - 1):
        ds = (ds + [(x - D(x, sig[i])) / sig[i]])[-order:]
        k = len(ds)

        def basis(tau, j):
            return math.prod((tau - sig[i - m]) / (sig[i - j] - sig[i - m]) for m in range(k) if m != j)
        coef = [integrate.quad(basis, sig[i], sig[i + 1], args=(j,), epsrel=1e-13, epsabs=1e-14)[0] for j in range(k)]
        x = x + sum(c * dd for c, dd in zip(coef, reversed(ds)))
    return x


REFS = {"euler_ancestral": ref_euler_ancestral, "dpmpp_sde": ref_dpmpp_sde, "dpm_2": ref_dpm_2, "lms": ref_lms,
        "dpmpp_2m_sde": lambda *a: ref_dpmpp_msde(*a, order=2), "dpmpp_3m_sde": lambda *a: ref_dpmpp_msde(*a, order=3)}


@pytest.mark.parametrize("sampler,opts,steps", [
    ("euler_ancestral", {"eta": 0.6, "s_noise": 1.1}, 8), ("dpmpp_sde", {"eta": 0.8, "s_noise": 0.9}, 6),
    ("dpmpp_sde", {"r": 0.3}, 6), ("dpmpp_2m_sde", {"eta": 0.5}, 10), ("dpmpp_3m_sde", {}, 10),
    ("dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.2}, 18), ("dpm_2", {}, 7), ("lms", {}, 9)])
def test_kdiffusion_formulation_through_wrap_kdiffusion(sampler, opts, steps):
    """Our sampler on a VP schedule with the sigma-space denoiser wrapped by wrap_kdiffusion == the k-diffusion
    algorithm on x~ = x / alpha with the same denoiser and noise (k-diffusion's sigmas = our grid's sigma / alpha)."""
    s = d.get_schedule("vp_linear")
    gm = random_mixture(6, 4, seed=3)

    def denoiser(x_tilde, sigma):  # exact E[x0 | x0 + sigma n = x~], k-diffusion's convention
        return gm.posterior_mean(x_tilde, torch.ones_like(sigma), sigma)

    ts = d.get_timesteps("karras", steps, s)
    sig = s.edm_sigma(ts[:-1]).tolist() + [0.0]
    x_tilde = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sig[0]
    g = torch.Generator().manual_seed(1)
    draws = {(i, k): torch.randn(5, 6, generator=g, dtype=torch.float64) for i in range(steps) for k in range(2)}
    calls = []  # our noise(t_from, t_to) -> the reference's (step, stage) by call order within a step

    def ours_noise(t_from, t_to):
        i = min(range(steps), key=lambda j: abs(float(ts[j]) - t_from))
        calls.append(i)
        return draws[(i, calls.count(i) - 1)]

    ref = REFS[sampler](lambda x, sg: denoiser(x, torch.full((x.shape[0],), sg, dtype=torch.float64)), x_tilde, sig,
                        lambda i, k: draws[(i, k)], opts.get("eta", 1.0), opts.get("s_noise", 1.0),
                        **({"r": opts["r"]} if "r" in opts else {}))
    alpha_T = float(s.alpha(ts[0]))
    noise = {"noise": ours_noise} if sampler not in ("dpm_2", "lms") else {}
    a = d.sample(d.wrap_kdiffusion(denoiser, s), alpha_T * x_tilde, s, sampler=sampler, timesteps=ts, **opts, **noise)
    torch.testing.assert_close(a, ref, rtol=1e-9, atol=1e-9)


def test_wrap_kdiffusion_is_the_exact_vp_denoiser():
    """E[x0 | x_t] = E[x0 | x_t / alpha]: the sigma-space mixture denoiser wrapped for VP is the VP one; a
    k-diffusion denoiser cannot be called where alpha = 0."""
    gm = random_mixture(6, 4, seed=3)
    s = d.get_schedule("cosine")
    model = d.wrap_kdiffusion(lambda x, sg: gm.posterior_mean(x, torch.ones_like(sg), sg), s)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0.05, 0.99, 7, dtype=torch.float64)
    for got, want in zip(model(x, t), gm.denoiser(s)(x, t)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    rf = d.RectifiedFlow()
    with pytest.raises(ValueError, match="alpha"):
        d.wrap_kdiffusion(lambda x, sg: x, rf)(x, torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="input_scaling"):
        d.wrap_model(lambda x, sg: x, s, input_scaling="vp")
