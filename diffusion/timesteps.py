"""Time grids for samplers: 1-D float64 tensors from t_max down to exactly 0 (clean data).

A grid of n steps has n + 1 entries; the last step always lands on t = 0, so no noise is left.
"""
from __future__ import annotations

import inspect
import math

import torch

from .schedule import VE, Discrete, RectifiedFlow, Schedule, shift_time


def _finish(ts: torch.Tensor) -> torch.Tensor:
    ts = ts.to(torch.float64)
    ts[-1] = 0.0
    return ts


def _check_steps(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {n!r}")
    return n


def _t_start(schedule: Schedule, t_max: float | None) -> float:
    return float(schedule.t_max if t_max is None else t_max)


def _t_end(schedule: Schedule) -> float:
    """Smallest trained positive time: the last training timestep, VE's sigma_min (score-SDE trains
    sigma in [sigma_min, sigma_max]), else 1e-3."""
    if isinstance(schedule, Discrete):
        return 1.0 / schedule.num_train_timesteps
    if isinstance(schedule, VE):
        return float(schedule.t_from_edm_sigma(torch.tensor(schedule.sigma_min, dtype=torch.float64)))
    return 1e-3


def timesteps_uniform(n: int, schedule: Schedule, t_max: float | None = None) -> torch.Tensor:
    """Uniform in t from t_max to 0 (DDPM / DDIM 'linspace')."""
    return _finish(torch.linspace(_t_start(schedule, t_max), 0.0, _check_steps(n) + 1, dtype=torch.float64))


def timesteps_trailing(n: int, schedule: Schedule, t_max: float | None = None) -> torch.Tensor:
    """'Trailing' spacing (Lin et al. 2024, Table 2): starts at the last training timestep; on a
    discrete table every time is an integer timestep, as diffusers' timestep_spacing='trailing'."""
    _check_steps(n)
    if isinstance(schedule, Discrete) and t_max is None:
        N = schedule.num_train_timesteps
        steps = torch.round(torch.arange(N, 0, -N / n, dtype=torch.float64))[:n] - 1
        return _finish(torch.cat([schedule.t_from_timestep(steps), torch.zeros(1, dtype=torch.float64)]))
    return timesteps_uniform(n, schedule, t_max)


def timesteps_leading(n: int, schedule: Schedule, steps_offset: int = 1) -> torch.Tensor:
    """'Leading' spacing with an offset, the Stable Diffusion 1.x default in diffusers."""
    _check_steps(n)
    if not isinstance(schedule, Discrete):
        raise ValueError("timesteps_leading needs a Discrete schedule; use 'uniform' or 'trailing'")
    N = schedule.num_train_timesteps
    steps = (torch.arange(n, dtype=torch.float64) * (N // n)).round().flip(0) + steps_offset
    return _finish(torch.cat([schedule.t_from_timestep(steps), torch.zeros(1, dtype=torch.float64)]))


# Log-SNR where a grid starting at pure noise (alpha(t_max) = 0) takes its first step to: Stable Diffusion's
# last trained step (scaled_linear, alpha_bar = 0.0047). Measured on an exact mixture score (docs/sampling.md):
# 2-6x lower error than spending steps down from log-SNR -30 at 5 / 10 / 20 steps.
LOG_SNR_FIRST_STEP = -5.364


def timesteps_log_snr(n: int, schedule: Schedule, t_max: float | None = None) -> torch.Tensor:
    """Uniform in log-SNR (Lu et al. 2022, DPM-Solver) down to the smallest trained time, then 0.

    Where alpha(t_max) = 0 (zero-terminal-SNR tables, rectified flow) log-SNR is -inf at the start: the first
    step goes from t_max to log-SNR LOG_SNR_FIRST_STEP, the rest are uniform in log-SNR from there."""
    _check_steps(n)
    t_start = _t_start(schedule, t_max)
    if n == 1:
        return timesteps_uniform(1, schedule, t_max)
    lam = schedule.log_snr(torch.tensor([t_start, _t_end(schedule)], dtype=torch.float64)).clamp(max=30.0)
    lam_start, lam_end = float(lam[0]), float(lam[1])
    if math.isfinite(lam_start):
        grid = schedule.t_from_log_snr(torch.linspace(lam_start, lam_end, n, dtype=torch.float64))
    else:  # pure noise at t_start: one step to a finite log-SNR, then uniform
        lam_first = min(LOG_SNR_FIRST_STEP, lam_end)
        grid = torch.cat([torch.zeros(1, dtype=torch.float64),
                          schedule.t_from_log_snr(torch.linspace(lam_first, lam_end, n - 1, dtype=torch.float64))])
    grid[0] = t_start
    return _finish(torch.cat([grid, torch.zeros(1, dtype=torch.float64)]))


def timesteps_karras(n: int, schedule: Schedule, rho: float = 7.0, sigma_min: float | None = None,
                     sigma_max: float | None = None) -> torch.Tensor:
    """EDM grid (Karras et al. 2022, eq. 5) in sigma / alpha with rho = 7, then sigma = 0."""
    _check_steps(n)
    s_lo = float(schedule.edm_sigma(torch.tensor(_t_end(schedule), dtype=torch.float64))) if sigma_min is None else sigma_min
    s_hi = float(schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64))) if sigma_max is None else sigma_max
    if not math.isfinite(s_hi):  # alpha(t_max) = 0: cap as SD3 / EDM do
        s_hi = 1e3
    if not (0 < s_lo < s_hi and rho > 0):
        raise ValueError(f"the karras grid needs 0 < sigma_min < sigma_max and rho > 0; got sigma_min={s_lo:.6g}, "
                         f"sigma_max={s_hi:.6g}, rho={rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
    sig[-1], sig[0] = s_lo, s_hi  # exact ends (one step: s_hi); (s ** (1 / rho)) ** rho can exceed s_hi by an ulp
    return _finish(torch.cat([schedule.t_from_edm_sigma(sig), torch.zeros(1, dtype=torch.float64)]))


def timesteps_shifted(n: int, schedule: Schedule, shift: float | None = None) -> torch.Tensor:
    """Uniform t warped by the SD3 shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024)."""
    _check_steps(n)
    if shift is None:
        shift = schedule.shift if isinstance(schedule, RectifiedFlow) else 3.0
    return _finish(shift_time(timesteps_uniform(n, schedule), shift))


def timesteps_blend(n: int, schedule: Schedule, weight: float = 0.75, t_max: float | None = None) -> torch.Tensor:
    """Between uniform and log-SNR: t_i = (1 - weight) t_uniform_i + weight t_log_snr_i. Keeps log-SNR's fine
    steps at high noise but ends further from 0, so a Heun-type last (Euler) step to t = 0 is not spent below the
    data's scale (heun at 5 steps on SD's table: 1.1-3.4x lower error than either; docs/sampling.md)."""
    if not 0 <= weight <= 1:
        raise ValueError(f"the blend grid needs 0 <= weight <= 1 (0: uniform, 1: log_snr); got weight={weight}")
    uniform, log_snr = timesteps_uniform(n, schedule, t_max), timesteps_log_snr(n, schedule, t_max)
    return _finish((1 - weight) * uniform + weight * log_snr)


TIME_GRIDS = {
    "uniform": timesteps_uniform, "trailing": timesteps_trailing, "leading": timesteps_leading,
    "log_snr": timesteps_log_snr, "karras": timesteps_karras, "shifted": timesteps_shifted,
    "blend": timesteps_blend,
}


def schedule_kind(schedule: Schedule) -> str:
    """The row of DEFAULT_GRIDS: flow (rectified flow without a resolution shift), flow_shifted, ve; VP schedules
    by their terminal log-SNR: vp_zero (zero terminal SNR), vp_short (above -7, e.g. SD's scaled_linear table,
    -5.4), vp (the linear DDPM table, -10.1; vp_linear, cosine)."""
    if isinstance(schedule, RectifiedFlow):
        return "flow" if schedule.shift == 1 else "flow_shifted"
    if isinstance(schedule, VE):
        return "ve"
    lam = float(schedule.log_snr(torch.tensor(schedule.t_max, dtype=torch.float64)))
    return "vp_zero" if not math.isfinite(lam) else "vp_short" if lam > -7 else "vp"


# The default grid per (schedule kind, sampler, steps): {kind: {sampler: ((fewest steps, grid), ...)}}, the last
# entry whose fewest steps <= steps applies. Written by `python benchmarks/default_grids.py --write` (error vs NFE
# of every deterministic sampler on every named grid, 4 exact-score mixtures x 6 schedules and the shipped default
# model: per kind, sampler and NFE 5 / 10 / 20 / 50 the grid with the lowest worst-case ratio to the best one, i.e.
# minimax; 3 held-out mixtures checked after; docs/sampling.md). Samplers without a row: trailing (shifted for
# rectified flow); SDE_LIKE take the row of the ODE solver they extend.
DEFAULT_GRIDS: dict = {
    "vp_short": {
        "ddim": ((1, "blend"), (8, "karras")),
        "dpm_2": ((1, "blend"), (8, "log_snr")),
        "dpmpp_2m": ((1, "log_snr"),),
        "dpmpp_3m": ((1, "log_snr"),),
        "euler": ((1, "blend"), (8, "karras")),
        "heun": ((1, "trailing"), (5, "blend"), (8, "karras")),
        "lms": ((1, "blend"), (8, "log_snr"), (16, "karras")),
        "unipc": ((1, "log_snr"),),
    },
    "vp_zero": {
        "ddim": ((1, "blend"), (16, "log_snr")),
        "dpm_2": ((1, "blend"), (8, "log_snr")),
        "dpmpp_2m": ((1, "blend"), (8, "log_snr")),
        "dpmpp_3m": ((1, "blend"), (8, "log_snr")),
        "euler": ((1, "blend"), (16, "log_snr")),
        "heun": ((1, "trailing"), (5, "blend"), (8, "log_snr")),
        "lms": ((1, "blend"), (8, "log_snr")),
        "unipc": ((1, "blend"), (8, "log_snr")),
    },
    "vp": {
        "ddim": ((1, "blend"),),
        "dpm_2": ((1, "trailing"), (5, "blend"), (18, "log_snr")),
        "dpmpp_2m": ((1, "blend"), (36, "log_snr")),
        "dpmpp_3m": ((1, "trailing"), (8, "blend"), (16, "log_snr")),
        "euler": ((1, "blend"),),
        "heun": ((1, "trailing"), (8, "blend"), (18, "log_snr")),
        "lms": ((1, "blend"), (16, "log_snr")),
        "unipc": ((1, "blend"), (16, "log_snr")),
    },
    "ve": {
        "ddim": ((1, "trailing"),),
        "dpm_2": ((1, "blend"), (5, "trailing"), (18, "blend")),
        "dpmpp_2m": ((1, "trailing"),),
        "dpmpp_3m": ((1, "trailing"), (36, "karras")),
        "euler": ((1, "trailing"),),
        "heun": ((1, "trailing"), (18, "karras")),
        "lms": ((1, "trailing"), (16, "karras"), (36, "trailing")),
        "unipc": ((1, "trailing"),),
    },
    "flow": {
        "ddim": ((1, "shifted"),),
        "dpm_2": ((1, "shifted"), (8, "blend")),
        "dpmpp_2m": ((1, "shifted"), (8, "blend")),
        "dpmpp_3m": ((1, "shifted"), (8, "blend")),
        "euler": ((1, "shifted"),),
        "flow_heun": ((1, "shifted"), (8, "blend")),
        "heun": ((1, "shifted"),),
        "lms": ((1, "shifted"), (36, "blend")),
        "unipc": ((1, "shifted"), (8, "blend")),
    },
}
SDE_LIKE = {"dpmpp_sde": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m", "dpmpp_3m_sde": "dpmpp_3m", "dpm_adaptive": "dpmpp_2m"}


def default_time_grid(schedule: Schedule, sampler: str | None = None, steps: int | None = None,
                      table: dict | None = None) -> str:
    """The grid diffusion.sample uses without a grid argument: DEFAULT_GRIDS[schedule_kind][sampler] at `steps`
    (default 20), else trailing (shifted for rectified flow). `table`: another table of DEFAULT_GRIDS' form."""
    rows = (DEFAULT_GRIDS if table is None else table).get(schedule_kind(schedule), {})
    rule = rows.get(SDE_LIKE.get(sampler, sampler))
    if rule is None:
        return "shifted" if isinstance(schedule, RectifiedFlow) else "trailing"
    n = 20 if steps is None else steps
    if not isinstance(n, int) or n < 1:  # the grid itself reports the bad steps
        return rule[0][1]
    return [grid for first, grid in rule if n >= first][-1]


def grid_options(name: str) -> list:
    """The keyword options of a named time grid (e.g. karras: rho, sigma_min, sigma_max)."""
    if name not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {name!r}; valid: {sorted(TIME_GRIDS)}")
    return [p for p in inspect.signature(TIME_GRIDS[name]).parameters if p not in ("n", "schedule")]


def get_timesteps(name: str, n: int, schedule: Schedule, **options) -> torch.Tensor:
    """Build a named time grid with n steps (n + 1 times ending at 0); `options` are the grid's own keywords."""
    valid = grid_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"time grid {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(sorted(valid)) or 'none'}")
    return TIME_GRIDS[name](n, schedule, **options)


def check_timesteps(ts) -> torch.Tensor:
    """Validate a user grid: 1-D, strictly decreasing, inside [0, 1], ending at 0."""
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if len(ts) < 2:
        raise ValueError("a time grid needs at least 2 entries (1 step)")
    if torch.any((ts < 0) | (ts > 1)) or torch.any(torch.isnan(ts)):
        raise ValueError(f"time grid must lie in [0, 1]; got [{ts.min():.4g}, {ts.max():.4g}]")
    if torch.any(ts[1:] >= ts[:-1]):
        raise ValueError("time grid must be strictly decreasing (from noise at t_max to data at 0)")
    if ts[-1] != 0:
        raise ValueError(f"time grid must end at t = 0 (clean data), got {ts[-1].item():.4g}")
    return ts


def timesteps_from_sigmas(sigmas, schedule: Schedule) -> torch.Tensor:
    """A grid given in EDM sigma = sigma / alpha (k-diffusion's sigmas), strictly decreasing and ending at 0,
    converted to t once (schedule.t_from_edm_sigma); every sigma must lie within the schedule's range."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(sig) < 2 or sig[-1] != 0:
        raise ValueError(f"sigmas must end at 0 (clean data) and have at least 2 entries; got {sig.tolist()[-3:]}")
    if torch.isnan(sig).any() or torch.any(sig[1:] >= sig[:-1]):
        raise ValueError("sigmas must be strictly decreasing (from noise to data at 0)")
    limit = float(schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    if sig[0] > limit * (1 + 1e-9):
        raise ValueError(f"sigmas[0]={float(sig[0]):.6g} exceeds this schedule's largest EDM sigma {limit:.6g} "
                         f"(at t_max={schedule.t_max:.4g}), where the model is undefined")
    ts = schedule.t_from_edm_sigma(sig[:-1]).clamp(0.0, schedule.t_max)
    return check_timesteps(torch.cat([ts, torch.zeros(1, dtype=torch.float64)]))
