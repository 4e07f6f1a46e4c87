"""Samplers as plain functions over a denoiser model_fn(x_t, t) -> (x0, eps).

Every sampler has the signature sample_<name>(model_fn, x, ts, schedule, *, generator=None,
callback=None, progress=False, **options); ts is a decreasing float64 grid ending at t = 0 built
by diffusion.timesteps. Coefficients are read from the schedule once per grid, as Python floats.
Randomness comes from `generator`: one torch.Generator per sample makes each sample depend on its
own seed and not on the batch it is drawn in.
"""
from __future__ import annotations

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


class _Grid:
    """alpha, sigma, their derivatives and log-SNR on the grid, as Python floats."""

    def __init__(self, schedule: Schedule, ts: torch.Tensor):
        ts = ts.to(torch.float64)
        self.t = ts.tolist()
        self.alpha = schedule.alpha(ts).tolist()
        self.sigma = schedule.sigma(ts).tolist()
        self.d_alpha = schedule.d_alpha(ts).tolist()
        self.d_sigma = schedule.d_sigma(ts).tolist()
        self.schedule = schedule

    def lam(self, i: int) -> float:
        a, s = self.alpha[i], self.sigma[i]
        if s == 0:
            return math.inf
        if a == 0:
            return -math.inf
        return math.log(a) - math.log(s)  # half log-SNR, as DPM-Solver's lambda

    def edm_sigma(self, i: int) -> float:
        return math.inf if self.alpha[i] == 0 else self.sigma[i] / self.alpha[i]

    def velocity(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """dx_t/dt = alpha' x0 + sigma' eps at grid time i."""
        return self.d_alpha[i] * x0 + self.d_sigma[i] * eps


def denoise(model_fn: Callable, x: torch.Tensor, t: float):
    """Call the denoiser at scalar time t and check its output."""
    x0, eps = model_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
    if x0.shape != x.shape or eps.shape != x.shape:
        raise ValueError(f"model_fn returned shapes {tuple(x0.shape)}, {tuple(eps.shape)} for input {tuple(x.shape)}")
    if not (torch.isfinite(x0).all() and torch.isfinite(eps).all()):
        raise FloatingPointError(
            f"model output is not finite at t={t:.4g}; an eps/score model cannot be used where alpha(t) = 0 "
            f"(start the grid below t=1, e.g. schedule.t_max < 1) — or the network itself produced NaN/Inf")
    return x0, eps


def _steps(ts, progress: bool, name: str):
    n = len(ts) - 1
    return tqdm(range(n), desc=name, leave=False) if progress else range(n)


def _report(callback, i, t, x, x0):
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})


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
def sample_ddpm(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0) (Ho et al. 2020, Alg. 2)."""
    g = _Grid(schedule, ts)
    for i in _steps(ts, progress, "ddpm"):
        x0, _ = denoise(model_fn, x, g.t[i])
        a_i, s_i, a_j, s_j = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_j == 0:
            x_new = a_j * x0
        else:
            a_ij = a_i / a_j  # forward transition t_j -> t_i: x_i = a_ij x_j + s_ij noise
            s_ij2 = s_i ** 2 - a_ij ** 2 * s_j ** 2
            mean = (a_ij * s_j ** 2 / s_i ** 2) * x + (a_j * s_ij2 / s_i ** 2) * x0
            x_new = mean + _posterior_std(g, i, i + 1) * randn_like(x, generator)
        _report(callback, i, g.t[i], x, x0)
        x = x_new
    return x


def sample_ddim(model_fn, x, ts, schedule, *, eta: float = 0.0, generator=None, callback=None, progress=False):
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,
    c = eta * posterior std; eta = 0 is deterministic, eta = 1 is DDPM."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    g = _Grid(schedule, ts)
    for i in _steps(ts, progress, "ddim"):
        x0, eps = denoise(model_fn, x, g.t[i])
        c = eta * _posterior_std(g, i, i + 1)
        x_new = g.alpha[i + 1] * x0 + math.sqrt(max(g.sigma[i + 1] ** 2 - c ** 2, 0.0)) * eps
        if c > 0:
            x_new = x_new + c * randn_like(x, generator)
        _report(callback, i, g.t[i], x, x0)
        x = x_new
    return x


def _churn(model_fn, x, g: _Grid, i: int, n: int, s_churn, s_tmin, s_tmax, s_noise, generator):
    """EDM stochastic churn (Karras et al. 2022, Alg. 2 lines 4-6): raise the noise level of x
    from sigma to sigma_hat = (1 + gamma) sigma. Returns (x_hat, t_hat)."""
    sig = g.edm_sigma(i)
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sig <= s_tmax and math.isfinite(sig) else 0.0
    if gamma == 0:
        return x, g.t[i]
    sched = g.schedule
    t_hat = min(float(sched.t_from_edm_sigma(torch.tensor(sig * (1 + gamma), dtype=torch.float64))), 1.0)
    tt = torch.tensor(t_hat, dtype=torch.float64)
    sig_hat, a_hat = float(sched.edm_sigma(tt)), float(sched.alpha(tt))
    noise = randn_like(x, generator) * (s_noise * math.sqrt(max(sig_hat ** 2 - sig ** 2, 0.0)))
    return a_hat * (x / g.alpha[i] + noise), t_hat


def sample_euler(model_fn, x, ts, schedule, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, generator=None, callback=None, progress=False):
    """Euler on the PF-ODE in sigma/alpha (Karras et al. 2022, eq. 4) with optional churn.

    In the scaled variable x/alpha an Euler step is x0 + sigma_next eps, so without churn this is
    exactly DDIM(eta=0); written this way it also starts from alpha = 0."""
    g = _Grid(schedule, ts)
    n = len(ts) - 1
    for i in _steps(ts, progress, "euler"):
        x_hat, t_hat = _churn(model_fn, x, g, i, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        x0, eps = denoise(model_fn, x_hat, t_hat)
        _report(callback, i, t_hat, x_hat, x0)
        x = g.alpha[i + 1] * x0 + g.sigma[i + 1] * eps
    return x


def sample_heun(model_fn, x, ts, schedule, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, generator=None, callback=None, progress=False):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Alg. 2); Euler on the last step (to
    sigma = 0) and on a step from alpha = 0, where sigma/alpha is infinite."""
    g = _Grid(schedule, ts)
    n = len(ts) - 1
    sched = schedule
    for i in _steps(ts, progress, "heun"):
        x_hat, t_hat = _churn(model_fn, x, g, i, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        x0, eps = denoise(model_fn, x_hat, t_hat)
        _report(callback, i, t_hat, x_hat, x0)
        a_j, s_j = g.alpha[i + 1], g.sigma[i + 1]
        x_euler = a_j * x0 + s_j * eps
        tt = torch.tensor(t_hat, dtype=torch.float64)
        a_hat = float(sched.alpha(tt))
        if s_j == 0 or a_hat == 0:
            x = x_euler
            continue
        sig_hat, sig_j = float(sched.edm_sigma(tt)), s_j / a_j
        _, eps_j = denoise(model_fn, x_euler, g.t[i + 1])
        # x~_next = x~_hat + (sig_j - sig_hat) (eps + eps_j) / 2 in the scaled variable x~ = x / alpha
        x = a_j * (x_hat / a_hat + (sig_j - sig_hat) * 0.5 * (eps + eps_j))
    return x


# --- multistep exponential integrators -------------------------------------------------------------
def sample_dpmpp_2m(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-SNR on x0;
    first order on the first step and on the final step to t = 0."""
    return _dpmpp_multistep(model_fn, x, ts, schedule, 2, callback, progress, "dpmpp_2m")


def sample_dpmpp_3m(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """DPM-Solver++(3M) (Lu et al. 2022, third-order multistep on x0), warming up with lower orders
    and lowering the order for the last two steps of short grids as DPM-Solver does."""
    return _dpmpp_multistep(model_fn, x, ts, schedule, 3, callback, progress, "dpmpp_3m")


def _dpmpp_multistep(model_fn, x, ts, schedule, order, callback, progress, name):
    g = _Grid(schedule, ts)
    n = len(ts) - 1
    hist: list = []  # (x0, lambda) of previous steps, newest last
    for i in _steps(ts, progress, name):
        x0, _ = denoise(model_fn, x, g.t[i])
        _report(callback, i, g.t[i], x, x0)
        lam_i, lam_j = g.lam(i), g.lam(i + 1)
        s_i, a_j, s_j = g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_j == 0:  # final step to clean data: lambda = +inf, only first order is defined
            x = a_j * x0
            continue
        h = lam_j - lam_i
        phi1 = -math.expm1(-h)  # 1 - e^{-h}
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
        d = x0
        if k >= 2:
            x0_1, lam_1 = usable[0]
            r0 = (lam_i - lam_1) / h
            d1_0 = (x0 - x0_1) / r0
            if k == 2:
                d = x0 + 0.5 * d1_0
            else:
                x0_2, lam_2 = usable[1]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h - 1.0  # (1 - e^{-h}) / h - 1
                phi3 = phi2 / h + 0.5  # ((1 - e^{-h}) / h - 1) / h + 1/2
                x = (s_j / s_i) * x + a_j * phi1 * x0 - a_j * phi2 * d1 + a_j * phi3 * d2
                hist.append((x0, lam_i))
                continue
        x = (s_j / s_i) * x + a_j * phi1 * d
        hist.append((x0, lam_i))
    return x


# --- flow matching (velocity) ODE --------------------------------------------------------------------
def sample_flow_euler(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """Euler on dx/dt = alpha' x0 + sigma' eps in x_t itself (rectified flow; Liu et al. 2022, SD3)."""
    g = _Grid(schedule, ts)
    for i in _steps(ts, progress, "flow_euler"):
        x0, eps = denoise(model_fn, x, g.t[i])
        _report(callback, i, g.t[i], x, x0)
        x = x + (g.t[i + 1] - g.t[i]) * g.velocity(i, x0, eps)
    return x


def sample_flow_heun(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """Heun (trapezoidal) on the velocity ODE in x_t; Euler on the last step to t = 0."""
    g = _Grid(schedule, ts)
    for i in _steps(ts, progress, "flow_heun"):
        x0, eps = denoise(model_fn, x, g.t[i])
        _report(callback, i, g.t[i], x, x0)
        dt = g.t[i + 1] - g.t[i]
        u = g.velocity(i, x0, eps)
        x_euler = x + dt * u
        if g.t[i + 1] == 0:
            x = x_euler
            continue
        x0_j, eps_j = denoise(model_fn, x_euler, g.t[i + 1])
        x = x + dt * 0.5 * (u + g.velocity(i + 1, x0_j, eps_j))
    return x


SAMPLERS = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m, "dpmpp_3m": sample_dpmpp_3m,
    "flow_euler": sample_flow_euler, "flow_heun": sample_flow_heun,
}

# model evaluations per step (the last step of heun / flow_heun costs one)
NFE_PER_STEP = {"heun": 2, "flow_heun": 2}
