"""One entry point: sample any model with any registered sampler, picked by name."""
from __future__ import annotations

from typing import Callable

import torch

from .prediction import check_prediction, to_x0_eps
from . import samplers_ode, samplers_sde  # noqa: F401  (their samplers register themselves in SAMPLERS)
from .samplers import SAMPLERS, as_generators, randn_like
from .schedule import Schedule
from .timesteps import check_timesteps, default_time_grid, get_timesteps, timesteps_from_sigmas
from .fitted_grid import is_grid_file, load_time_grid


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def prior_sample(shape, schedule: Schedule, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """x_T ~ N(0, alpha^2 + sigma^2) at t_max: the start of sampling for unit-variance data.
    `generator` may be an int seed (sample i gets seed + i) or a list of per-sample generators."""
    gens = as_generators(generator, shape[0], "cpu")
    x = randn_like(torch.empty(shape, dtype=dtype), gens).to(device)
    return schedule.prior_std() * x


def sample(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, sampler: str = "dpmpp_2m",
           steps: int | None = None, prediction: str | None = None, time_grid: str | None = None,
           timesteps=None, cond: dict | None = None, generator=None, callback=None,
           progress: bool = False, grid_options: dict | None = None, sigmas=None, return_nfe: bool = False,
           **sampler_options):
    """Sample from x_T at t_max to t = 0.

    model_fn(x_t, t, **cond) returns (x0, eps); with `prediction` set (eps | x0 | v | velocity |
    score) it returns that raw output instead and is converted here. t is continuous, shape (B,).
    The time grid is one of:
      `time_grid` (+ `steps`, default 20): a named grid from diffusion.timesteps (default: the measured best for
        the sampler, steps and schedule, diffusion.timesteps.default_time_grid), with `grid_options` its keyword
        options, e.g. time_grid="karras",
        grid_options={"sigma_min": 0.002, "sigma_max": 80, "rho": 7} (an option the grid lacks is an error);
        or the path of a .json grid written by diffusion.optimize_timesteps (steps read from it; a different
        `steps` or schedule is an error);
      `timesteps`: an explicit decreasing grid in t ending at 0;
      `sigmas`: an explicit decreasing grid of EDM sigma = sigma / alpha (k-diffusion's sigmas) ending at 0.
    `generator`: a Generator, one per sample (seed-determined, batch-size-independent samples),
    or int seed(s). `sampler_options` go to the sampler (e.g. eta, s_noise, noise for the SDE samplers).
    return_nfe=True returns (x, number of model evaluations made)."""
    fn = get_sampler(sampler)
    if not torch.is_tensor(x_T) or not torch.isfinite(x_T).all():
        raise ValueError("x_T must be a finite tensor (e.g. diffusion.prior_sample(shape, schedule, seed))")
    if (timesteps is not None) + (sigmas is not None) + (time_grid is not None) > 1:
        raise ValueError("pass one of time_grid (with steps), timesteps or sigmas")
    if grid_options and (timesteps is not None or sigmas is not None):
        raise ValueError("grid_options configure a named time_grid; they do not apply to explicit timesteps / sigmas")
    if timesteps is not None:
        ts = check_timesteps(timesteps)
    elif sigmas is not None:
        ts = timesteps_from_sigmas(sigmas, schedule)
    elif is_grid_file(time_grid):
        if grid_options:
            raise ValueError("grid_options configure a named time_grid; a .json grid file is used as written")
        ts = load_time_grid(time_grid, steps, schedule, sampler).timesteps
    else:
        steps = 20 if steps is None else steps
        grid = time_grid or default_time_grid(schedule, sampler, steps)
        ts = check_timesteps(get_timesteps(grid, steps, schedule, **(grid_options or {})))
    cond = cond or {}
    calls = [0]
    if prediction is not None:
        kind = check_prediction(prediction)

        def denoiser(x, t):
            calls[0] += 1
            return to_x0_eps(kind, model_fn(x, t, **cond), x, t, schedule)
    else:
        def denoiser(x, t):
            calls[0] += 1
            return model_fn(x, t, **cond)
    gens = as_generators(generator, x_T.shape[0], x_T.device)
    x = fn(denoiser, x_T, ts, schedule, generator=gens, callback=callback, progress=progress, **sampler_options)
    return (x, calls[0]) if return_nfe else x


def count_nfe(sampler: str, steps: int) -> int:
    """Model evaluations a sampler spends on `steps` steps from a start with alpha > 0, from its registration
    (Heun-type: 2 per step, 1 on the last). An adaptive sampler (dpm_adaptive) has no fixed count: use
    sample(..., return_nfe=True)."""
    fn = get_sampler(sampler)
    if fn.nfe_per_step is None:
        raise ValueError(f"{sampler!r} chooses its steps adaptively: its NFE is known only after sampling; "
                         f"use sample(..., return_nfe=True)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return fn.nfe_per_step * (steps - 1) + fn.nfe_final_step
