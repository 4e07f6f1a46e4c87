"""ODE samplers of the k-diffusion family: linear multistep (LMS), DPM-Solver-2 and adaptive DPM-Solver-12/23.

Same contract as diffusion.samplers (registered there by @register_sampler). LMS and DPM-Solver-2 integrate the
probability-flow ODE dx~/dsig = eps in the EDM variable x~ = x / alpha, sig = sigma / alpha (Karras et al. 2022),
written back in x_t; dpm_adaptive steps in log-SNR with per-sample step sizes.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .samplers import _checked, _eval, _Grid, _lincomb, _report, _steps, _time_dtype, _update, register_sampler
from .schedule import append_dims


def _lms_weights(nodes: list, sig_next: float) -> list:
    """c_m = int_{nodes[0]}^{sig_next} L_m(tau) d tau for the Lagrange basis L_m on `nodes` (newest first), exactly:
    in u = (tau - nodes[0]) / (sig_next - nodes[0]) each L_m is a polynomial on [0, 1] with moderate coefficients."""
    width = sig_next - nodes[0]
    u = [(s - nodes[0]) / width for s in nodes]
    weights = []
    for m in range(len(nodes)):
        poly = [1.0]  # coefficients of prod_{l != m} (u - u_l) / (u_m - u_l), lowest power first
        for l_ in range(len(nodes)):
            if l_ != m:
                scale = 1.0 / (u[m] - u[l_])
                poly = [(a * -u[l_] + b) * scale for a, b in zip(poly + [0.0], [0.0] + poly)]
        weights.append(width * sum(c / (p + 1) for p, c in enumerate(poly)))
    return weights


@register_sampler("lms")
def sample_lms(model_fn, x, ts, schedule, *, order: int = 4, generator=None, callback=None, progress=False):
    """Linear multistep in EDM sigma (Karras et al. 2022 / k-diffusion's sample_lms; diffusers'
    LMSDiscreteScheduler): x~_{i+1} = x~_i + sum_m c_m eps_{i-m}, c_m the integral over [sig_i, sig_{i+1}] of the
    Lagrange polynomial through the last `order` (sig, eps); the order warms up, and a step from alpha = 0 is Euler."""
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 8:
        raise ValueError(f"LMS order must be an integer in 1..8, got {order!r}")
    g, x = _Grid(schedule, ts, x), x.clone()
    hist: list = []  # (sig, eps), newest last; only finite sigma
    for i in _steps(ts, progress, "lms"):
        x0, eps = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        a_i, a_j, s_j = g.alpha[i], g.alpha[i + 1], g.sigma[i + 1]
        if a_i == 0:  # from pure noise: Euler in x~, x_j = alpha_j x0 + sigma_j eps
            x = _update(x, g, i, 0.0, (a_j, x0), (s_j, eps))
            continue
        hist = (hist + [(g.edm_sigma(i), eps)])[-order:]
        recent = hist[::-1]
        c = _lms_weights([s for s, _ in recent], s_j / a_j)
        x = _update(x, g, i, a_j / a_i, *[(a_j * c_m, e) for c_m, (_, e) in zip(c, recent)])
    return _checked(x)


@register_sampler("dpm_2", nfe_per_step=2, nfe_final_step=1)
def sample_dpm_2(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
    """DPM-Solver-2 in EDM sigma (Lu et al. 2022 / k-diffusion's sample_dpm_2; diffusers' KDPM2DiscreteScheduler):
    an Euler step to the midpoint sig_mid = sqrt(sig_i sig_{i+1}), then the whole step with the slope there:
    x~_{i+1} = x~_i + (sig_{i+1} - sig_i) eps_mid. Euler from alpha = 0 and to sigma = 0 (one evaluation)."""
    g, x = _Grid(schedule, ts, x), x.clone()
    mids = g.between(0.5)
    for i in _steps(ts, progress, "dpm_2"):
        x0, eps = _eval(model_fn, x, g.t_batch(i))
        _report(callback, i, g.t[i], x, x0)
        a_i, s_i, a_j, s_j = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if mids[i] is None:
            x = _update(x, g, i, 0.0, (a_j, x0), (s_j, eps))
            continue
        t_m, a_m, s_m = mids[i]
        x_m = _lincomb((a_m, x0), (s_m, eps))  # Euler in x~ to sig_mid: x~_mid = x0 + sig_mid eps
        _, eps_m = _eval(model_fn, x_m, torch.full((x.shape[0],), t_m, dtype=_time_dtype(x), device=x.device))
        x = _update(x, g, i, a_j / a_i, (a_j * (s_j / a_j - s_i / a_i), eps_m))
    return _checked(x)


class _Levels:
    """alpha, sigma and the model's time tensor at per-sample half log-SNR values lam (B,), from the schedule."""

    def __init__(self, schedule, lam: torch.Tensor, x: torch.Tensor):
        t = schedule.t_from_log_snr(2 * lam).clamp(0.0, 1.0)
        self.lam, self.alpha, self.sigma = lam, schedule._alpha(t), schedule._sigma(t)
        self.t = t.to(device=x.device, dtype=_time_dtype(x))


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample float64 coefficient (B,) broadcast against x, in x's dtype and device."""
    return append_dims(v.to(x.device), x)


def _dpm_solver_1(x, eps_s, lv_s: _Levels, lv: _Levels):
    """DPM-Solver-1 from level s to level lv (Lu et al. 2022, eq. 3.7): (alpha / alpha_s) x - sigma (e^h - 1) eps_s."""
    return _col(lv.alpha / lv_s.alpha, x) * x - _col(lv.sigma * torch.expm1(lv.lam - lv_s.lam), x) * eps_s


def _dpm_solver_23(model_fn, x, eps_s, lv_s: _Levels, at, order: int):
    """(x_low, x_high): DPM-Solver-1 and -2 (r1 = 1/2) for order 2, DPM-Solver-2 (r1 = 1/3) and -3 (r1 = 1/3,
    r2 = 2/3) for order 3 (Lu et al. 2022, Alg. 1-2), the model calls shared; at(r) is the level lambda_s + r h."""
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    lv_1, lv_t = at(r1), at(1.0)
    h = lv_t.lam - lv_s.lam
    _, eps_1 = _eval(model_fn, _dpm_solver_1(x, eps_s, lv_s, lv_1), lv_1.t)
    base = _dpm_solver_1(x, eps_s, lv_s, lv_t)
    second = base - (0.5 / r1) * _col(lv_t.sigma * torch.expm1(h), x) * (eps_1 - eps_s)
    if order == 2:
        return base, second
    r2 = 2.0 / 3.0
    lv_2 = at(r2)
    h2 = lv_2.lam - lv_s.lam
    phi_2 = _col(lv_2.sigma * (r2 / r1) * (torch.expm1(h2) / h2 - 1), x)
    u2 = _dpm_solver_1(x, eps_s, lv_s, lv_2) - phi_2 * (eps_1 - eps_s)
    _, eps_2 = _eval(model_fn, u2, lv_2.t)
    return second, base - _col(lv_t.sigma / r2 * (torch.expm1(h) / h - 1), x) * (eps_2 - eps_s)


@register_sampler("dpm_adaptive", nfe_per_step=None)
def sample_dpm_adaptive(model_fn, x, ts, schedule, *, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                        h_init: float = 0.05, safety: float = 0.9, max_growth: float = 2.0, max_attempts: int = 1000,
                        generator=None, callback=None, progress=False):
    """Adaptive DPM-Solver-12 / 23 (Lu et al. 2022, Sec. 3.3 / App. C; k-diffusion's dpm_adaptive), per sample.

    Each attempt takes a step h in half log-SNR with DPM-Solver-`order` and with the order below, sharing their
    model calls (order 3: 3 evaluations; order 2: 2; the first is reused after a rejection), and estimates the error
    E = RMS((x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|))) over the sample. E <= 1 accepts x_high; then
    h <- h min(safety E^{-1/order}, max_growth), at most what is left (the growth cap keeps a step whose error
    estimate is fooled by a smooth start from jumping over the data scale). Integrates from ts[0] to the grid's
    last positive time ts[-2] (the points in between are not used: pick the end with time_grid='karras' / 'log_snr'
    or sigmas=), then one x0 step to t = 0. Every sample has its own steps (the model gets a per-sample time
    tensor), so a sample does not depend on its batch; the number of model calls is known only afterwards
    (sample(..., return_nfe=True)). callback gets {"i": attempt, "t": (B,) tensor, "x", "x0"} per attempt."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order!r}")
    if not (rtol > 0 and atol >= 0 and h_init > 0 and 0 < safety <= 1 and max_growth > 1):
        raise ValueError(f"need rtol > 0, atol >= 0, h_init > 0, 0 < safety <= 1 and max_growth > 1; got rtol={rtol}, "
                         f"atol={atol}, h_init={h_init}, safety={safety}, max_growth={max_growth}")
    g, x = _Grid(schedule, ts, x), x.clone()
    lam_start, lam_end = g.lam(0), g.lam(max(len(ts) - 2, 0))
    if not math.isfinite(lam_start):
        raise ValueError(f"dpm_adaptive needs a start with alpha > 0 (finite log-SNR); the grid starts at "
                         f"t={g.t[0]:.4g} where alpha = 0: start below it (timesteps / sigmas whose first entry has "
                         f"alpha > 0)")
    B = x.shape[0]
    lam = torch.full((B,), lam_start, dtype=torch.float64)
    h = torch.full((B,), float(h_init), dtype=torch.float64)
    x_prev, eps_s = x.clone(), None
    bar = tqdm(desc="dpm_adaptive", leave=False) if progress else None
    for attempt in range(max_attempts + 1):
        active = lam < lam_end - 1e-5
        if not bool(active.any()):
            break
        if attempt == max_attempts:
            raise RuntimeError(f"dpm_adaptive did not reach the end of the grid in {max_attempts} attempts "
                               f"(rtol={rtol}, atol={atol}): loosen the tolerances or raise max_attempts")
        # finished samples ride along with a dummy step back inside [lam_start, lam_end]; their results are discarded
        h_act = torch.where(active, torch.minimum(h, lam_end - lam), torch.full_like(h, 0.5 * (lam_start - lam_end)))
        lv_s = _Levels(schedule, lam, x)
        if eps_s is None:  # x moved (or the first attempt): the model at the start of the step
            x0_s, eps_s = _eval(model_fn, x, lv_s.t)
        _report(callback, attempt, lv_s.t, x, x0_s)
        x_low, x_high = _dpm_solver_23(model_fn, x, eps_s, lv_s,
                                       lambda r: _Levels(schedule, lam + r * h_act, x), order)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        err = ((x_low - x_high) / delta).reshape(B, -1).double().pow(2).mean(1).sqrt().cpu()
        accept = active & (err <= 1.0)
        if bool(accept.any()):
            keep = _col(accept.double(), x).bool()
            x, x_prev = torch.where(keep, x_high, x), torch.where(keep, x_low, x_prev)
            lam, eps_s = torch.where(accept, lam + h_act, lam), None
        factor = (safety * err.clamp_min(1e-12) ** (-1.0 / order)).clamp_max(max_growth)
        h = torch.where(active, h_act * factor, h)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    x0, _ = _eval(model_fn, x, _Levels(schedule, lam, x).t)  # the final step to t = 0
    return _checked(_lincomb((g.alpha[-1], x0)))
