"""Stochastic samplers of the k-diffusion family: Euler ancestral, DPM-Solver++(2S) SDE, DPM-Solver++(2M / 3M) SDE.

Same contract as diffusion.samplers (registered there by @register_sampler). Their fresh noise z comes from
`noise`:
* "brownian" (the SDE solvers' default): increments of one Brownian motion W on t in [0, 1] per sample, a
  Brownian tree (torchsde; k-diffusion's BrownianTreeNoiseSampler) seeded from that sample's generator,
  z = (W(t_i) - W(t_j)) / sqrt(t_i - t_j). The path does not depend on the grid, so the same seed with more steps
  gives a close sample (the solver converges to the SDE solution for that path) and a sample depends on its seed only;
* "iid" (Euler ancestral's default, as diffusers): a fresh N(0, I) from the generator at each step;
* a callable noise(t_from, t_to) -> tensor shaped like x (e.g. to feed the noise of another implementation).
The noise level in these samplers is the EDM sigma = sigma / alpha (Karras et al. 2022), as in k-diffusion;
eta scales the fresh noise (0: the underlying ODE solver) and s_noise multiplies z.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .samplers import (
    _checked, _dpmpp_multistep, _eval, _Grid, _lincomb, _report, _steps, _time_dtype, _update, randn_like,
    register_sampler,
)

NOISES = ("brownian", "iid")


class BrownianNoise:
    """z = (W(t_hi) - W(t_lo)) / sqrt(t_hi - t_lo) for a Brownian motion W on t in [0, 1] (a Brownian tree,
    Li et al. 2020, via torchsde): one tree per sample seeded from that sample's generator (a list of them), or
    one for the whole batch from a single generator / torch's global RNG. Trees live on the CPU in float64
    (float32 for lower-precision states); z is returned on x's device in x's dtype."""

    DIGITS = 8  # times are resolved to 1e-8 (the tree's tolerance); a shorter step has no increment

    def __init__(self, x: torch.Tensor, generator=None):
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - torchsde is a dependency
            raise ImportError("noise='brownian' needs torchsde (pip install torchsde), or pass noise='iid'") from e
        self.per_sample = isinstance(generator, (list, tuple))
        gens = list(generator) if self.per_sample else [generator]
        if self.per_sample and len(gens) != x.shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}: pass one per sample")
        self.device, self.dtype = x.device, x.dtype
        tree_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        size = tuple(x.shape[1:]) if self.per_sample else tuple(x.shape)
        # each tree's entropy is one draw from its generator: the path is a function of the seed alone
        seeds = [int(torch.randint(0, 2 ** 62, (), generator=g, device=g.device if g is not None else "cpu"))
                 for g in gens]
        self.trees = [torchsde.BrownianInterval(t0=0.0, t1=1.0, size=size, dtype=tree_dtype, device="cpu",
                                                entropy=seed, tol=10.0 ** -self.DIGITS, halfway_tree=True)
                      for seed in seeds]

    def __call__(self, t_from: float, t_to: float) -> torch.Tensor:
        lo, hi = round(min(t_from, t_to), self.DIGITS), round(max(t_from, t_to), self.DIGITS)
        if not hi > lo:
            raise ValueError(f"the step from t={t_from:.10g} to t={t_to:.10g} is shorter than the Brownian tree's "
                             f"resolution 1e-{self.DIGITS}: use a coarser grid or noise='iid'")
        w = torch.stack([tree(lo, hi) for tree in self.trees]) if self.per_sample else self.trees[0](lo, hi)
        return (w / math.sqrt(hi - lo)).to(device=self.device, dtype=self.dtype)


def noise_source(noise, x: torch.Tensor, generator=None) -> Callable:
    """noise(t_from, t_to) -> z shaped like x, from "brownian", "iid" or a callable (checked on use)."""
    if callable(noise):
        def checked(t_from, t_to):
            z = noise(t_from, t_to)
            if not torch.is_tensor(z) or z.shape != x.shape:
                raise ValueError(f"noise(t_from, t_to) must return a tensor of shape {tuple(x.shape)}, "
                                 f"got {getattr(z, 'shape', type(z).__name__)}")
            return z.to(device=x.device, dtype=x.dtype)
        return checked
    if noise == "iid":
        return lambda t_from, t_to: randn_like(x, generator)
    if noise == "brownian":
        return BrownianNoise(x, generator)
    raise ValueError(f"unknown noise {noise!r}; valid: {list(NOISES)} or a callable noise(t_from, t_to)")


def _check_noise_scales(eta: float, s_noise: float) -> None:
    if not (eta >= 0 and math.isfinite(eta)) or not (s_noise >= 0 and math.isfinite(s_noise)):
        raise ValueError(f"need finite eta >= 0 and s_noise >= 0, got eta={eta}, s_noise={s_noise}")


def _ancestral(a_i: float, s_i: float, a_j: float, s_j: float, eta: float) -> tuple:
    """(c_x, c_d, c_z) of the ancestral step x_j = c_x x_i + c_d D + c_z z from level i to level j in EDM sigma
    (k-diffusion's get_ancestral_step): sig_j^2 splits into fresh noise sig_up^2 = min(sig_j^2, eta^2 sig_j^2
    (1 - sig_j^2 / sig_i^2)) and sig_down^2, reached by a DDIM step with x0 = D. With x~ = x / alpha:
    x~_j = (sig_down / sig_i) x~_i + (1 - sig_down / sig_i) D + sig_up z, finite from alpha_i = 0 as well."""
    if s_j == 0:
        return 0.0, a_j, 0.0
    sig_j = s_j / a_j
    q2 = (s_j * a_i / (a_j * s_i)) ** 2  # (sig_j / sig_i)^2, 0 from pure noise
    sig_up = min(sig_j, eta * sig_j * math.sqrt(max(1.0 - q2, 0.0)))
    sig_down = math.sqrt(max(sig_j ** 2 - sig_up ** 2, 0.0))
    return a_j * sig_down / s_i, a_j * (1.0 - sig_down * a_i / s_i), a_j * sig_up


def _noise_term(c: float, draw: Callable, t_from: float, t_to: float) -> list:
    """[(c, z)] with z drawn only where it is used (c > 0): eta = 0 or s_noise = 0 draws nothing."""
    return [(c, draw(t_from, t_to))] if c > 0 else []


@register_sampler("euler_ancestral")
def sample_euler_ancestral(model_fn, x, ts, schedule, *, eta: float = 1.0, s_noise: float = 1.0, noise="iid",
                           generator=None, callback=None, progress=False):
    """Euler ancestral (k-diffusion; diffusers' EulerAncestralDiscreteScheduler at eta = 1): a DDIM step to
    sig_down, then fresh noise sig_up (see _ancestral); eta = 0 is Euler (= DDIM)."""
    _check_noise_scales(eta, s_noise)
    g, draw = _Grid(schedule, ts, x), noise_source(noise, x, generator)
    x = x.clone()
    for i in _steps(ts, progress, "euler_ancestral"):
        x0, _ = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        c_x, c_d, c_z = _ancestral(g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1], eta)
        x = _update(x, g, i, c_x, (c_d, x0), *_noise_term(c_z * s_noise, draw, g.t[i], g.t[i + 1]))
    return _checked(x)


@register_sampler("dpmpp_sde", nfe_per_step=2, nfe_final_step=1)
def sample_dpmpp_sde(model_fn, x, ts, schedule, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                     noise="brownian", generator=None, callback=None, progress=False):
    """DPM-Solver++(2S) with ancestral noise (k-diffusion's dpmpp_sde; diffusers' DPMSolverSDEScheduler at eta = 1,
    r = 1/2): an ancestral step to log-SNR lambda_i + r h, the model there, then an ancestral step from x_i to
    x_{i+1} on D = (1 - 1/(2r)) x0_i + 1/(2r) x0_mid; noise over [t_i, t_mid] and [t_i, t_{i+1}]. One Euler-ancestral
    step from alpha = 0 and to sigma = 0 (one evaluation)."""
    _check_noise_scales(eta, s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"r (where the intermediate point lies in log-SNR, as a fraction of the step) must be "
                         f"in (0, 1], got {r}")
    g, draw = _Grid(schedule, ts, x), noise_source(noise, x, generator)
    mids, f = g.between(r), 1.0 / (2.0 * r)
    x = x.clone()
    for i in _steps(ts, progress, "dpmpp_sde"):
        x0, _ = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        a_i, s_i, a_j, s_j = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if mids[i] is None:
            c_x, c_d, c_z = _ancestral(a_i, s_i, a_j, s_j, eta)
            x = _update(x, g, i, c_x, (c_d, x0), *_noise_term(c_z * s_noise, draw, g.t[i], g.t[i + 1]))
            continue
        t_m, a_m, s_m = mids[i]
        c_x, c_d, c_z = _ancestral(a_i, s_i, a_m, s_m, eta)
        x_m = _lincomb((c_x, x), (c_d, x0), *_noise_term(c_z * s_noise, draw, g.t[i], t_m))
        x0_m, _ = _eval(model_fn, x_m, torch.full((x.shape[0],), t_m, dtype=_time_dtype(x), device=x.device))
        c_x, c_d, c_z = _ancestral(a_i, s_i, a_j, s_j, eta)
        blend = [(c_d * (1.0 - f), x0)] if f != 1.0 else []
        x = _update(x, g, i, c_x, (c_d * f, x0_m), *blend, *_noise_term(c_z * s_noise, draw, g.t[i], g.t[i + 1]))
    return _checked(x)


@register_sampler("dpmpp_2m_sde")
def sample_dpmpp_2m_sde(model_fn, x, ts, schedule, *, eta: float = 1.0, s_noise: float = 1.0, noise="brownian",
                        generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers' sde-dpmsolver++ with the midpoint D1, k-diffusion's
    dpmpp_2m_sde): second-order multistep on x0 in h_eta = (1 + eta) h plus fresh noise; eta = 0 is dpmpp_2m."""
    _check_noise_scales(eta, s_noise)
    return _dpmpp_multistep(model_fn, x, ts, schedule, 2, callback, progress, "dpmpp_2m_sde", eta, s_noise,
                            noise_source(noise, x, generator))


@register_sampler("dpmpp_3m_sde")
def sample_dpmpp_3m_sde(model_fn, x, ts, schedule, *, eta: float = 1.0, s_noise: float = 1.0, noise="brownian",
                        generator=None, callback=None, progress=False):
    """DPM-Solver++(3M) SDE (k-diffusion's dpmpp_3m_sde): third-order multistep on x0 in h_eta = (1 + eta) h plus
    fresh noise, with dpmpp_3m's warm-up and short-grid tail; eta = 0 is dpmpp_3m."""
    _check_noise_scales(eta, s_noise)
    return _dpmpp_multistep(model_fn, x, ts, schedule, 3, callback, progress, "dpmpp_3m_sde", eta, s_noise,
                            noise_source(noise, x, generator))
