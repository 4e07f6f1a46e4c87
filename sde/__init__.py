"""sde: continuous-time score SDEs built from diffusion schedules, predictor-corrector and
probability-flow samplers, and exact likelihoods (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations")."""
from .likelihood import (
    DIVERGENCES, PROBES, Likelihood, bits_per_dim, dequantize, divergence_exact, divergence_hutchinson,
    log_likelihood, probes,
)
from .samplers import (
    CORRECTORS, PREDICTORS, SAMPLERS, ancestral_step,
    annealed_langevin_corrector, count_nfe, euler_maruyama_step, get_time_grid, langevin_corrector,
    langevin_step_size, reverse_diffusion_step, sample, sample_ode, sample_pc,
)
from .ode import ODE_METHODS, dopri5, solve
from .sdes import SDE, SDES, ReverseSDE, SubVP, SubVPSDE, VESDE, VPSDE, as_sde, get_sde, sde_names

__all__ = [
    "CORRECTORS", "DIVERGENCES", "ODE_METHODS", "PREDICTORS", "PROBES", "SAMPLERS", "SDE", "SDES", "Likelihood", "ReverseSDE", "SubVP", "SubVPSDE", "VESDE", "VPSDE", "ancestral_step",
    "annealed_langevin_corrector", "as_sde", "bits_per_dim", "count_nfe", "dequantize", "divergence_exact",
    "divergence_hutchinson", "dopri5", "euler_maruyama_step", "get_sde", "get_time_grid", "langevin_corrector",
    "langevin_step_size",
    "log_likelihood", "probes", "reverse_diffusion_step", "sample", "sample_ode", "sample_pc", "sde_names", "solve",
]
