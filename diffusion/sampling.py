"""One entry point: sample any model with any registered sampler, picked by name."""
from __future__ import annotations

from typing import Callable

import torch

from .prediction import check_prediction, to_x0_eps
from .samplers import NFE_PER_STEP, SAMPLERS, generators_from_seeds, randn_like
from .schedule import Schedule
from .timesteps import check_timesteps, default_time_grid, get_timesteps


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def _generators(generator, batch: int, device):
    """Accept None, a Generator, a list of Generators, an int seed or a list of int seeds."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generators_from_seeds(generator, batch, device)
    if isinstance(generator, (list, tuple)) and generator and isinstance(generator[0], int):
        return generators_from_seeds(list(generator), device=device)
    return generator


def prior_sample(shape, schedule: Schedule, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """x_T ~ N(0, alpha^2 + sigma^2) at t_max: the start of sampling for unit-variance data.
    `generator` may be an int seed (sample i gets seed + i) or a list of per-sample generators."""
    gens = _generators(generator, shape[0], "cpu")
    x = randn_like(torch.empty(shape, dtype=dtype), gens).to(device)
    return schedule.prior_std() * x


def sample(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, sampler: str = "dpmpp_2m",
           steps: int = 20, prediction: str | None = None, time_grid: str | None = None,
           timesteps=None, cond: dict | None = None, generator=None, callback=None,
           progress: bool = False, **sampler_options) -> torch.Tensor:
    """Sample from x_T at t_max to t = 0.

    model_fn(x_t, t, **cond) returns (x0, eps); with `prediction` set (eps | x0 | v | velocity |
    score) it returns that raw output instead and is converted here. t is continuous, shape (B,).
    `time_grid` names a grid from diffusion.timesteps (default: trailing; shifted for rectified
    flow); `timesteps` passes an explicit decreasing grid ending at 0 instead.
    `generator`: a Generator, one per sample (seed-determined, batch-size-independent samples),
    or int seed(s)."""
    fn = get_sampler(sampler)
    if not torch.is_tensor(x_T) or not torch.isfinite(x_T).all():
        raise ValueError("x_T must be a finite tensor (e.g. diffusion.prior_sample(shape, schedule, seed))")
    if timesteps is not None:
        ts = check_timesteps(timesteps)
    else:
        ts = check_timesteps(get_timesteps(time_grid or default_time_grid(schedule), steps, schedule))
    cond = cond or {}
    if prediction is not None:
        kind = check_prediction(prediction)

        def denoiser(x, t):
            return to_x0_eps(kind, model_fn(x, t, **cond), x, t, schedule)
    else:
        def denoiser(x, t):
            return model_fn(x, t, **cond)
    gens = _generators(generator, x_T.shape[0], x_T.device)
    return fn(denoiser, x_T, ts, schedule, generator=gens, callback=callback, progress=progress, **sampler_options)


def count_nfe(sampler: str, steps: int) -> int:
    """Model evaluations a sampler spends on `steps` steps (Heun-type: 2 per step, 1 on the last)."""
    per = NFE_PER_STEP.get(sampler, 1)
    return per * steps - (per - 1)
