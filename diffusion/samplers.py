"""Samplers as plain functions over a denoiser model_fn(x_t, t) -> (x0, eps).

Every sampler has the signature sample_<name>(model_fn, x, ts, schedule, *, generator=None,
callback=None, progress=False, **options); ts is a decreasing float64 grid ending at t = 0 built
by diffusion.timesteps. Coefficients are read from the schedule once per grid, as Python floats,
and the time tensors handed to model_fn are built once per grid too: a step never calls the schedule.
Each update is a linear combination written into the sampler's own copy of x (_update: one memory
pass per term, no allocation); NaN/Inf are caught by one reduction after the first step and one over
the result. model_fn must not keep references to its input x beyond the call; callbacks get copies.
Randomness comes from `generator`: one torch.Generator per sample makes each sample depend on its
own seed and not on the batch it is drawn in.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .schedule import Schedule


# --- shared plumbing ------------------------------------------------------------------------------
def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x; a list of generators draws each sample from its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}: pass one per sample")
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device)
                            for g in generator]).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def generators_from_seeds(seeds: Sequence[int] | int, batch: int | None = None, device="cpu") -> list:
    """One torch.Generator per sample; an int seed s gives seeds s, s+1, ... for the batch."""
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(batch or 1)]
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def as_generators(generator, batch: int, device="cpu"):
    """The `generator` argument of every sampler (diffusion and sde): None (global RNG), a Generator, a list of
    Generators (one per sample) pass through; an int seed s gives per-sample generators s, s+1, ..., a list of
    ints one generator per seed (generators_from_seeds)."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generators_from_seeds(generator, batch, device)
    if isinstance(generator, (list, tuple)) and generator and isinstance(generator[0], int):
        return generators_from_seeds(list(generator), device=device)
    return generator


SAMPLERS: dict = {}  # name -> sampler function, filled by @register_sampler


def register_sampler(name: str, nfe_per_step: int | None = 1, nfe_final_step: int | None = None):
    """Register a sampler under `name` with its model evaluations per step (score-SDE's register_predictor):
    `nfe_per_step` on every step but the last, which costs `nfe_final_step` (default: the same; Heun-type
    samplers take an Euler step there). None marks an adaptive sampler whose NFE is known only after it ran
    (sample(..., return_nfe=True) reports it)."""
    def register(fn: Callable) -> Callable:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered ({SAMPLERS[name].__module__})")
        fn.sampler_name, fn.nfe_per_step = name, nfe_per_step
        fn.nfe_final_step = nfe_per_step if nfe_final_step is None else nfe_final_step
        SAMPLERS[name] = fn
        return fn
    return register


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the time tensors handed to model_fn: float64 for a float64 state, else float32 (never
    half: bf16 cannot tell t = 0.999 from 1, so a network would see timestep 1000)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Grid:
    """alpha, sigma, their derivatives and log-SNR on the grid as Python floats, and the (B,) time
    tensors model_fn receives (float32/64 whatever x's dtype), built once."""

    def __init__(self, schedule: Schedule, ts: torch.Tensor, x: torch.Tensor):
        ts = ts.to(torch.float64)
        self.t = ts.tolist()
        if not all(0.0 <= t <= 1.0 for t in self.t):
            raise ValueError(f"time grid must lie in [0, 1]; got [{min(self.t):.4g}, {max(self.t):.4g}]")
        # validated once here, so the schedule's unchecked formulas serve the whole grid
        self.alpha = schedule._alpha(ts).tolist()
        self.sigma = schedule._sigma(ts).tolist()
        self.schedule, self._ts = schedule, ts
        self._t_batch = ts.to(device=x.device, dtype=_time_dtype(x))[:, None].expand(-1, x.shape[0]).contiguous()

    def t_batch(self, i: int) -> torch.Tensor:
        """The (B,) time tensor of grid point i."""
        return self._t_batch[i]

    @functools.cached_property
    def d_alpha(self) -> list:
        return self.schedule._d_alpha(self._ts).tolist()

    @functools.cached_property
    def d_sigma(self) -> list:
        return self.schedule._d_sigma(self._ts).tolist()

    def lam(self, i: int) -> float:
        a, s = self.alpha[i], self.sigma[i]
        if s == 0:
            return math.inf
        if a == 0:
            return -math.inf
        return math.log(a) - math.log(s)  # half log-SNR, as DPM-Solver's lambda

    def edm_sigma(self, i: int) -> float:
        return math.inf if self.alpha[i] == 0 else self.sigma[i] / self.alpha[i]

    def between(self, r: float) -> list:
        """Per step i, the level (t, alpha, sigma) at log-SNR lambda_i + r (lambda_{i+1} - lambda_i) (r = 1/2:
        EDM sigma sqrt(sigma_i sigma_{i+1}), the midpoint of DPM-Solver-2 / k-diffusion); None for a step from
        alpha = 0 or to sigma = 0, where lambda is infinite."""
        n = len(self.t) - 1
        steps = [i for i in range(n) if math.isfinite(self.lam(i)) and math.isfinite(self.lam(i + 1))]
        out: list = [None] * n
        if steps:
            lam = torch.tensor([self.lam(i) + r * (self.lam(i + 1) - self.lam(i)) for i in steps], dtype=torch.float64)
            t = self.schedule.t_from_log_snr(2 * lam).clamp(0.0, 1.0)
            alpha, sigma = self.schedule._alpha(t).tolist(), self.schedule._sigma(t).tolist()
            for k, i in enumerate(steps):
                out[i] = (float(t[k]), alpha[k], sigma[k])
        return out


def _lincomb(*terms) -> torch.Tensor:
    """sum_k c_k T_k for (Python float c_k, tensor T_k) pairs, into one fresh tensor."""
    (c0, t0), *rest = terms
    out = torch.mul(t0, c0)
    for c, t in rest:
        out = out.add_(t, alpha=c) if t.dtype == out.dtype else out + c * t
    return out


_NOT_FINITE = ("An eps/score model cannot be used where alpha(t) = 0 (start the grid below t=1, e.g. "
               "schedule.t_max < 1) — or the network itself produced NaN/Inf")


def _checked(x: torch.Tensor, t: float | None = None) -> torch.Tensor:
    """Full NaN/Inf check: one reduction (isfinite().all() costs several times more), the elementwise
    test only to rule out a sum that overflowed. Samplers run it after the first step (where an eps model
    at alpha = 0 fails) and on the result; a check per step would cost as much as the step itself."""
    if not math.isfinite(float(x.sum(dtype=torch.float32) if x.element_size() < 4 else x.sum())) \
            and not bool(torch.isfinite(x).all()):
        where = f"after the step from t={t:.4g}" if t is not None else "at the end of sampling"
        raise FloatingPointError(f"the sample is not finite {where}: a model output was not finite. {_NOT_FINITE}")
    return x


def _update(x: torch.Tensor, g: _Grid, i: int, c_x: float, *terms) -> torch.Tensor:
    """x <- c_x x + sum_k c_k T_k for step i of grid g, written into x, the sampler's own buffer: one pass
    per term and a single lerp when c_x + c_1 = 1. Out of place where autograd tracks a tensor, a term
    shares x's memory or has another dtype."""
    inplace = not x.requires_grad
    for _, T in terms:
        if T.requires_grad or T.dtype != x.dtype or T.data_ptr() == x.data_ptr():
            inplace = False
    if not inplace:
        x = _lincomb((c_x, x), *terms) if c_x != 0 else _lincomb(*terms)
    else:
        (c1, t1), *rest = terms
        if c_x == 0:
            torch.mul(t1, c1, out=x)
        elif not rest and abs(c_x + c1 - 1.0) < 1e-12:
            x.lerp_(t1, c1)  # (1 - c1) x + c1 T1 in one pass
        else:
            if c_x != 1.0:
                x.mul_(c_x)
            x.add_(t1, alpha=c1)
        for c, T in rest:
            x.add_(T, alpha=c)
    return _checked(x, g.t[i]) if i == 0 else x


def _eval(model_fn: Callable, x: torch.Tensor, t: torch.Tensor):
    """model_fn at the (B,) time tensor t, with its output shapes checked."""
    x0, eps = model_fn(x, t)
    if x0.shape != x.shape or eps.shape != x.shape:
        raise ValueError(f"model_fn returned shapes {tuple(x0.shape)}, {tuple(eps.shape)} for input {tuple(x.shape)}")
    return x0, eps


def denoise(model_fn: Callable, x: torch.Tensor, t: float):
    """Call the denoiser at scalar time t and check its output (shapes, NaN/Inf)."""
    x0, eps = _eval(model_fn, x, torch.full((x.shape[0],), t, dtype=_time_dtype(x), device=x.device))
    if not math.isfinite(float(x0.sum() + eps.sum())) and not (torch.isfinite(x0).all() and torch.isfinite(eps).all()):
        raise FloatingPointError(
            f"model output is not finite at t={t:.4g}; an eps/score model cannot be used where alpha(t) = 0 "
            f"(start the grid below t=1, e.g. schedule.t_max < 1) — or the network itself produced NaN/Inf")
    return x0, eps


def _steps(ts, progress: bool, name: str):
    n = len(ts) - 1
    return tqdm(range(n), desc=name, leave=False) if progress else range(n)


def _report(callback, i, t, x, x0):
    if callback is not None:  # x is updated in place afterwards: hand out a copy
        callback({"i": i, "t": t, "x": x.clone(), "x0": x0})


def _posterior_std(g: _Grid, i: int, j: int) -> float:
    """Std of q(x_tj | x_ti, x0) for tj < ti (Ho et al. 2020, eq. 7, any schedule)."""
    a_i, s_i, a_j, s_j = g.alpha[i], g.sigma[i], g.alpha[j], g.sigma[j]
    if s_j == 0:
        return 0.0
    if s_i == 0 or a_j == 0:
        return s_j
    ratio = (a_i * s_j) / (a_j * s_i)
    return s_j * math.sqrt(max(1.0 - ratio ** 2, 0.0))


# --- first-order ------------------------------------------------------------------------------------
@register_sampler("ddpm")
def sample_ddpm(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0) (Ho et al. 2020, Alg. 2)."""
    g, x = _Grid(schedule, ts, x), x.clone()
    for i in _steps(ts, progress, "ddpm"):
        x0, _ = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        a_i, s_i, a_j, s_j = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_j == 0:
            x = _update(x, g, i, 0.0, (a_j, x0))
            continue
        a_ij = a_i / a_j  # forward transition t_j -> t_i: x_i = a_ij x_j + s_ij noise
        s_ij2 = s_i ** 2 - a_ij ** 2 * s_j ** 2
        # posterior mean (a_ij s_j^2 x + a_j s_ij^2 x0) / s_i^2, plus its std times z
        x = _update(x, g, i, a_ij * s_j ** 2 / s_i ** 2, (a_j * s_ij2 / s_i ** 2, x0),
                    (_posterior_std(g, i, i + 1), randn_like(x, generator)))
    return _checked(x)


@register_sampler("ddim")
def sample_ddim(model_fn, x, ts, schedule, *, eta: float = 0.0, generator=None, callback=None, progress=False):
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,
    c = eta * posterior std; eta = 0 is deterministic, eta = 1 is DDPM."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    g, x = _Grid(schedule, ts, x), x.clone()
    for i in _steps(ts, progress, "ddim"):
        x0, eps = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        c = eta * _posterior_std(g, i, i + 1)
        noise = [(c, randn_like(x, generator))] if c > 0 else []
        s_eps = math.sqrt(max(g.sigma[i + 1] ** 2 - c ** 2, 0.0))
        x = _update(x, g, i, 0.0, (g.alpha[i + 1], x0), (s_eps, eps), *noise)
    return _checked(x)


def _floor_digits(v: float, digits: int = 4) -> float:
    """v rounded down to `digits` significant digits (a bound that is safe to type back in)."""
    scale = 10.0 ** (math.floor(math.log10(v)) - digits + 1)
    return math.floor(v / scale) * scale


def _churn_plan(g: _Grid, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> list:
    """EDM's per-step churn factors gamma_i (Karras et al. 2022, Alg. 2 line 4), checked before sampling:
    the churned level (1 + gamma_i) sigma_i (EDM sigma = sigma / alpha) must not exceed the schedule's
    largest one, at t_max, beyond which the network is undefined (also where the formulas would extend)."""
    if not (s_churn >= 0 and math.isfinite(s_churn)) or not s_noise >= 0:
        raise ValueError(f"need s_churn >= 0 (finite) and s_noise >= 0, got s_churn={s_churn}, s_noise={s_noise}")
    n = len(g.t) - 1
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    sigmas = [g.edm_sigma(i) for i in range(n)]  # a step from alpha = 0 (sigma = inf) is pure noise already
    gammas = [gamma if gamma > 0 and s_tmin <= sig <= s_tmax and math.isfinite(sig) else 0.0 for sig in sigmas]
    t_max = g.schedule.t_max
    limit = float(g.schedule.edm_sigma(torch.tensor(t_max, dtype=torch.float64)))
    bad = [i for i in range(n) if gammas[i] > 0 and (1 + gammas[i]) * sigmas[i] > limit * (1 + 1e-9)]
    if bad:
        i = bad[0]
        raise ValueError(
            f"s_churn={s_churn} with s_tmax={s_tmax} would raise the EDM noise level sigma/alpha of step {i} "
            f"from {sigmas[i]:.4g} to {(1 + gamma) * sigmas[i]:.4g}, beyond this schedule's largest EDM sigma "
            f"{limit:.4g} (at t_max={t_max:.4g}), where the model is undefined; set s_tmax <= "
            f"{_floor_digits(limit / (1 + gamma)):.4g} so churned steps stay within it (or s_churn=0)")
    return gammas


def _churn(x, g: _Grid, i: int, gamma: float, s_noise: float, generator):
    """EDM stochastic churn (Karras et al. 2022, Alg. 2 lines 5-6): raise the noise level of x from
    sigma to sigma_hat = (1 + gamma) sigma. Returns (x_hat, t_hat, alpha_hat, sigma_hat / alpha_hat)."""
    sig = g.edm_sigma(i)
    if gamma == 0:
        return x, g.t[i], g.alpha[i], sig
    sched = g.schedule
    # within t_max by _churn_plan; the min only absorbs the round trip's last-digit error
    t_hat = min(float(sched.t_from_edm_sigma(torch.tensor(sig * (1 + gamma), dtype=torch.float64))), sched.t_max)
    tt = torch.tensor(t_hat, dtype=torch.float64)
    sig_hat, a_hat = float(sched.edm_sigma(tt)), float(sched.alpha(tt))
    # x_hat = a_hat (x / alpha + sqrt(sig_hat^2 - sig^2) s_noise z), a fresh tensor; no z is drawn for a zero term
    c_noise = a_hat * s_noise * math.sqrt(max(sig_hat ** 2 - sig ** 2, 0.0))
    noise = [(c_noise, randn_like(x, generator))] if c_noise > 0 else []
    return _lincomb((a_hat / g.alpha[i], x), *noise), t_hat, a_hat, sig_hat


def _t_tensor(g: _Grid, i: int, t: float, x: torch.Tensor) -> torch.Tensor:
    return g.t_batch(i) if t == g.t[i] else torch.full((x.shape[0],), t, dtype=_time_dtype(x), device=x.device)


@register_sampler("euler")
def sample_euler(model_fn, x, ts, schedule, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, generator=None, callback=None, progress=False):
    """Euler on the PF-ODE in sigma/alpha (Karras et al. 2022, eq. 4) with optional churn.

    In the scaled variable x/alpha an Euler step is x0 + sigma_next eps, so without churn this is
    exactly DDIM(eta=0); written this way it also starts from alpha = 0.
    Churn (s_churn > 0) raises sigma/alpha of each step in [s_tmin, s_tmax] by 1 + gamma; a step whose
    churned level would exceed the schedule's sigma/alpha at t_max raises a ValueError before sampling
    (a Stable Diffusion table's first step does with the default s_tmax = inf): lower s_tmax."""
    g, x = _Grid(schedule, ts, x), x.clone()
    gammas = _churn_plan(g, s_churn, s_tmin, s_tmax, s_noise)
    for i in _steps(ts, progress, "euler"):
        x_hat, t_hat, _, _ = _churn(x, g, i, gammas[i], s_noise, generator)
        x0, eps = _eval(model_fn, x_hat, _t_tensor(g, i, t_hat, x))
        _report(callback, i, t_hat, x_hat, x0)
        x = _update(x_hat, g, i, 0.0, (g.alpha[i + 1], x0), (g.sigma[i + 1], eps))
    return _checked(x)


@register_sampler("heun", nfe_per_step=2, nfe_final_step=1)
def sample_heun(model_fn, x, ts, schedule, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, generator=None, callback=None, progress=False):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Alg. 2); Euler on the last step (to
    sigma = 0) and on a step from alpha = 0, where sigma/alpha is infinite. Churn as in sample_euler:
    churned levels beyond the schedule's sigma/alpha at t_max are rejected before sampling."""
    g, x = _Grid(schedule, ts, x), x.clone()
    gammas = _churn_plan(g, s_churn, s_tmin, s_tmax, s_noise)
    for i in _steps(ts, progress, "heun"):
        x_hat, t_hat, a_hat, sig_hat = _churn(x, g, i, gammas[i], s_noise, generator)
        x0, eps = _eval(model_fn, x_hat, _t_tensor(g, i, t_hat, x))
        _report(callback, i, t_hat, x_hat, x0)
        a_j, s_j = g.alpha[i + 1], g.sigma[i + 1]
        if s_j == 0 or a_hat == 0:  # Euler
            x = _update(x_hat, g, i, 0.0, (a_j, x0), (s_j, eps))
            continue
        x_euler = _lincomb((a_j, x0), (s_j, eps))
        _, eps_j = _eval(model_fn, x_euler, g.t_batch(i + 1))
        # x~_next = x~_hat + (sig_j - sig_hat) (eps + eps_j) / 2 in the scaled variable x~ = x / alpha
        c = a_j * (s_j / a_j - sig_hat) * 0.5
        x = _update(x_hat, g, i, a_j / a_hat, (c, eps), (c, eps_j))
    return _checked(x)


# --- multistep exponential integrators -------------------------------------------------------------
@register_sampler("dpmpp_2m")
def sample_dpmpp_2m(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-SNR on x0;
    first order on the first step and on the final step to t = 0."""
    return _dpmpp_multistep(model_fn, x, ts, schedule, 2, callback, progress, "dpmpp_2m")


@register_sampler("dpmpp_3m")
def sample_dpmpp_3m(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """DPM-Solver++(3M) (Lu et al. 2022, third-order multistep on x0), warming up with lower orders
    and lowering the order for the last two steps of short grids as DPM-Solver does."""
    return _dpmpp_multistep(model_fn, x, ts, schedule, 3, callback, progress, "dpmpp_3m")


def _dpmpp_multistep(model_fn, x, ts, schedule, order, callback, progress, name, eta=0.0, s_noise=1.0,
                     noise=None):
    """DPM-Solver++(kM) and, for eta > 0, its SDE form (Lu et al. 2022, eq. 17 / k-diffusion's 2M/3M-SDE):
    the exponential integrator of x_t under the reverse SDE whose noise is scaled by eta, in
    h_eta = (1 + eta) h with a fresh-noise term sigma_j sqrt(1 - e^{-2 eta h}) s_noise z; `noise(t_i, t_j)`
    draws z. eta = 0 is the ODE solver itself."""
    g, x = _Grid(schedule, ts, x), x.clone()
    n = len(ts) - 1
    hist: list = []  # (x0, lambda) of the previous two steps, newest last
    for i in _steps(ts, progress, name):
        x0, _ = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        lam_i, lam_j = g.lam(i), g.lam(i + 1)
        s_i, a_j, s_j = g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_j == 0:  # final step to clean data: lambda = +inf, only first order is defined
            x = _update(x, g, i, 0.0, (a_j, x0))
            continue
        h = lam_j - lam_i
        h_eta = (1.0 + eta) * h
        phi1 = -math.expm1(-h_eta)  # 1 - e^{-h_eta}
        # how many past x0 we can use: order cap, warm-up, finite step ratios, short-grid tail
        k = min(order, len(hist) + 1)
        if n < 15 and i == n - 2:
            k = min(k, 2)
        usable = []
        for m in range(1, k):  # consecutive history only; a step from alpha = 0 has lambda = -inf
            if not math.isfinite(hist[-m][1]):
                break
            usable.append(hist[-m])
        k = len(usable) + 1
        # D1, D2 as Python-float weights on (x0, x0_1, x0_2), newest first, so that the update is
        # one linear combination of x and the stored x0's
        if k == 1:  # DPM-Solver++(1) = DDIM: x_j = (sigma_j / sigma_i) x_i + alpha_j (1 - e^{-h}) x0
            w = [a_j * phi1]
        else:
            r0 = (lam_i - usable[0][1]) / h
            d1_0 = [1 / r0, -1 / r0, 0.0]  # (x0 - x0_1) / r0
            if k == 2:  # 2M (Lu et al. 2022, Alg. 2): D = x0 + D1_0 / 2
                w = [a_j * phi1 * (float(m == 0) + 0.5 * d1_0[m]) for m in range(2)]
            else:  # 3M: D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
                r1 = (usable[0][1] - usable[1][1]) / h
                d1_1 = [0.0, 1 / r1, -1 / r1]  # (x0_1 - x0_2) / r1
                diff = [p - q for p, q in zip(d1_0, d1_1)]
                d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d1_0, diff)]
                d2 = [q / (r0 + r1) for q in diff]
                phi2 = phi1 / h_eta - 1.0  # (1 - e^{-h}) / h - 1, in h_eta
                phi3 = phi2 / h_eta + 0.5  # ((1 - e^{-h}) / h - 1) / h + 1/2
                # x_j = (sigma_j / sigma_i) x_i + alpha_j (phi1 x0 - phi2 D1 + phi3 D2)
                w = [a_j * (phi1 * float(m == 0) - phi2 * d1[m] + phi3 * d2[m]) for m in range(3)]
        x_prev = [x0] + [u[0] for u in usable]
        terms = list(zip(w, x_prev))
        c_x = s_j / s_i
        if eta > 0:  # x_j gets e^{-eta h} of x_i (0 from alpha = 0) and fresh noise for the rest of its variance
            c_x *= math.exp(-eta * h)
            c_z = s_j * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise
            if c_z > 0:
                terms.append((c_z, noise(g.t[i], g.t[i + 1])))
        x = _update(x, g, i, c_x, *terms)
        hist = (hist + [(x0, lam_i)])[-2:]
    return _checked(x)


def _unipc_b(h: float, variant: str) -> float:
    """B(h) of UniPC: e^{-h} - 1 (bh2) or -h (bh1), in the data-prediction sign convention; both are
    -h + O(h^2), and a step from alpha = 0 or to sigma = 0 (h = inf) takes the finite bh2 value -1."""
    return math.expm1(-h) if variant == "bh2" or not math.isfinite(h) else -h


def _unipc_weights(h: float, rks: list, p: int, corrector: bool, variant: str) -> list:
    """UniPC coefficients (Zhao et al. 2023, Alg. 1-2 with data prediction): rho solving
    R rho = b with R_ak = r_k^a and b_a = a! phi_{a+1}(h) h / B(h); order-2 UniP uses rho = 1/2."""
    hh = -h
    B = _unipc_b(h, variant)
    R = [[r ** a for r in rks] for a in range(p)]
    b, phi, fact = [], math.expm1(hh) / hh - 1.0, 1.0
    for a in range(1, p + 1):
        b.append(phi * fact / B)
        fact *= a + 1
        phi = phi / hh - 1.0 / fact
    if corrector:
        return [0.5] if p == 1 else _solve(R, b)
    if p == 1:
        return []
    return [0.5] if p == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])


def _solve(R: list, b: list) -> list:
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


@register_sampler("unipc")
def sample_unipc(model_fn, x, ts, schedule, *, order: int = 2, variant: str = "bh2", corrector: bool = True,
                 generator=None, callback=None, progress=False):
    """UniPC (Zhao et al. 2023): the multistep predictor UniP-p on x0 in log-SNR, and the corrector UniC
    that refines each new point with the model value already computed there (no extra evaluation).
    Order drops near the end of the grid (lower_order_final) and warms up at its start."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    g, x = _Grid(schedule, ts, x), x.clone()
    n = len(ts) - 1
    hist: list = []  # (x0, lambda) at previous grid points, newest last
    x_prev, step = None, None  # the state at the previous grid point (its buffer is then reused), its step

    def combine(buf, i, h, rks, p, x_i, x0_j=None):
        """x_j = (sigma_j / sigma_i) x_i + alpha_j (1 - e^{-h}) m0 - alpha_j B(h) (sum_k rho_k D_k
        [+ rho_c (x0_j - m0) for the corrector]), D_k = (m_k - m0) / r_k; written into buf."""
        a_j, s_j, s_i = g.alpha[i + 1], g.sigma[i + 1], g.sigma[i]
        B = _unipc_b(h, variant)
        rho = _unipc_weights(h, rks, p, x0_j is not None, variant)
        w0, terms = -a_j * math.expm1(-h), []
        for (m_k, _), r_k, rho_k in zip(hist[-p:-1][::-1], rks, rho):  # m_1 .. m_{p-1}, newest first
            terms.append((-a_j * B * rho_k / r_k, m_k))
            w0 += a_j * B * rho_k / r_k
        if x0_j is not None:
            terms.append((-a_j * B * rho[-1], x0_j))
            w0 += a_j * B * rho[-1]
        return _update(buf, g, i, 0.0, (s_j / s_i, x_i), (w0, hist[-1][0]), *terms)

    for i in _steps(ts, progress, "unipc"):
        x0, _ = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        if step is not None:  # UniC: redo the last step with the model value at its end, into x's buffer
            x = combine(x, i - 1, *step, x_prev, x0)
        hist = (hist + [(x0, g.lam(i))])[-order:]
        lam_i, s_j = g.lam(i), g.sigma[i + 1]
        if s_j == 0 or not math.isfinite(lam_i):  # to clean data, or from alpha = 0: first order
            p, h, rks = 1, math.inf, []
        else:
            h = g.lam(i + 1) - lam_i
            p = min(order, n - i, len(hist))
            while p > 1 and not math.isfinite(hist[-p][1]):  # consecutive finite history only
                p -= 1
            rks = [(lam - lam_i) / h for _, lam in hist[-p:-1][::-1]] + [1.0]
        buf = x_prev if x_prev is not None else torch.empty_like(x)  # x_{i-1} is no longer needed
        x_prev, x = x, combine(buf, i, h, rks, p, x)  # UniP
        step = (h, rks, p) if corrector else None
    return _checked(x)


# --- flow matching (velocity) ODE --------------------------------------------------------------------
@register_sampler("flow_euler")
def sample_flow_euler(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """Euler on dx/dt = u = alpha' x0 + sigma' eps in x_t itself (rectified flow; Liu et al. 2022, SD3)."""
    g, x = _Grid(schedule, ts, x), x.clone()
    for i in _steps(ts, progress, "flow_euler"):
        x0, eps = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        # x_j = x_i + dt u_i; with eps = (x_i - alpha_i x0) / sigma_i it is one combination of x_i and x0
        # (for rectified flow the lerp x_j = x0 + (t_j / t_i)(x_i - x0): one pass)
        dt = g.t[i + 1] - g.t[i]
        k = dt * g.d_sigma[i] / g.sigma[i]
        x = _update(x, g, i, 1.0 + k, (dt * g.d_alpha[i] - k * g.alpha[i], x0))
    return _checked(x)


@register_sampler("flow_heun", nfe_per_step=2, nfe_final_step=1)
def sample_flow_heun(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """Heun (trapezoidal) on the velocity ODE in x_t; Euler on the last step to t = 0."""
    g, x = _Grid(schedule, ts, x), x.clone()
    for i in _steps(ts, progress, "flow_heun"):
        x0, eps = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        dt = g.t[i + 1] - g.t[i]
        if g.t[i + 1] == 0:  # Euler: x + dt u_i
            x = _update(x, g, i, 1.0, (dt * g.d_alpha[i], x0), (dt * g.d_sigma[i], eps))
            continue
        x_euler = _lincomb((1.0, x), (dt * g.d_alpha[i], x0), (dt * g.d_sigma[i], eps))
        x0_j, eps_j = _eval(model_fn, x_euler, g.t_batch(i + 1))
        h = 0.5 * dt  # x + dt (u_i + u_j) / 2
        x = _update(x, g, i, 1.0, (h * g.d_alpha[i], x0), (h * g.d_sigma[i], eps),
                    (h * g.d_alpha[i + 1], x0_j), (h * g.d_sigma[i + 1], eps_j))
    return _checked(x)

