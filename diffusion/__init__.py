"""diffusion: one noise-schedule core, (x0, eps) conversions, model wrappers and samplers."""
from .interop import prediction_from_diffusers, schedule_from_diffusers, time_input_from_diffusers
from .losses import DENSITIES, DiffusionLoss, density_pdf, resolution_shift, sample_timesteps
from .prediction import PREDICTIONS, check_prediction, target, to_x0_eps
from .samplers import SAMPLERS, generators_from_seeds, randn_like
from .sampling import count_nfe, get_sampler, prior_sample, sample
from .fitted_grid import FittedGrid, load_time_grid, optimize_timesteps
from .schedule import (
    SCHEDULES, VE, Cosine, Discrete, RectifiedFlow, Schedule, VPLinear, append_dims, get_schedule, shift_time,
)
from .timesteps import TIME_GRIDS, get_timesteps
from .wrappers import classifier_free_guidance, time_signal, wrap_kdiffusion, wrap_model

__all__ = [
    "FittedGrid", "load_time_grid", "optimize_timesteps",
    "DENSITIES", "DiffusionLoss", "density_pdf", "resolution_shift",
    "sample_timesteps",
    "PREDICTIONS", "SAMPLERS", "SCHEDULES", "TIME_GRIDS", "VE", "Cosine", "Discrete", "RectifiedFlow",
    "Schedule", "VPLinear", "append_dims", "check_prediction", "classifier_free_guidance", "count_nfe",
    "generators_from_seeds", "get_sampler", "get_schedule", "get_timesteps", "prediction_from_diffusers",
    "prior_sample", "randn_like", "sample", "schedule_from_diffusers", "shift_time", "target",
    "time_input_from_diffusers", "time_signal", "to_x0_eps", "wrap_kdiffusion", "wrap_model", "ProjectScheduler",
]


def __getattr__(name):
    if name == "ProjectScheduler":  # imported on first use: it loads diffusers (~3 s)
        from .scheduler_adapter import ProjectScheduler
        return ProjectScheduler
    raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
