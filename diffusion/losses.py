"""Training objective on the schedule core (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3).

x_t = alpha(t) x0 + sigma(t) eps with alpha/sigma from the schedule, and the network regresses
diffusion.prediction.target(kind, x0, eps, t): rectified flow with kind="velocity" (eps - x0) is SD3's
objective; any schedule with eps / x0 / v is the DDPM / v-prediction objective. t is drawn from one
of SD3's timestep densities (Sec. 3.1, eq. 19-21), optionally warped by the resolution shift (eq. 23).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .prediction import check_prediction, target
from .schedule import Discrete, RectifiedFlow, Schedule, shift_time
from .wrappers import TIME_SIGNALS, _output_tensor, time_signal

__all__ = ["DENSITIES", "WEIGHTINGS", "sample_timesteps", "density_pdf", "mode_map", "mode_inverse", "cosmap",
           "resolution_shift", "DiffusionLoss"]

DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("none", "min_snr")


# ----------------------------------------------------------------------------------------------- densities
def mode_map(u: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3 eq. 20: f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u); u ~ U(0,1) -> t."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def _check_mode_scale(scale: float) -> None:
    # f_mode is monotone (a valid change of variables) only for -1 <= s <= 2 / (pi - 2) (SD3 Sec. 3.1)
    if not -1 <= scale <= 2 / (math.pi - 2):
        raise ValueError(f"mode_scale must lie in [-1, {2 / (math.pi - 2):.4f}] for f_mode to be monotone, got {scale}")


def mode_inverse(t: torch.Tensor, scale: float, iters: int = 60) -> torch.Tensor:
    """u = f_mode^{-1}(t) by bisection (f_mode decreases from 1 at u=0 to 0 at u=1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = mode_map(mid, scale) > t  # still left of the root
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def cosmap(u: torch.Tensor) -> torch.Tensor:
    """SD3 eq. 21: f(u) = 1 - 1 / (tan(pi u / 2) + 1), matching the cosine schedule's log-SNR in RF time."""
    return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)


def sample_timesteps(density: str, n: int, generator: torch.Generator | None = None, device="cpu",
                     dtype=torch.float32, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29) -> torch.Tensor:
    """n times in [0, 1] from `density` (SD3 Sec. 3.1): uniform, logit_normal(m, s) = sigmoid(N(m, s^2)),
    mode(scale) via eq. 20, cosmap via eq. 21."""
    if density == "uniform":
        t = torch.rand(n, generator=generator, dtype=torch.float64)
    elif density == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, dtype=torch.float64))
    elif density == "mode":
        _check_mode_scale(mode_scale)
        t = mode_map(torch.rand(n, generator=generator, dtype=torch.float64), mode_scale)
    elif density == "cosmap":
        t = cosmap(torch.rand(n, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"unknown timestep density {density!r}; valid: {list(DENSITIES)}")
    return t.clamp(0, 1).to(device=device, dtype=dtype)


def density_pdf(density: str, t, logit_mean: float = 0.0, logit_std: float = 1.0,
                mode_scale: float = 1.29) -> torch.Tensor:
    """Closed-form density pi(t) on (0, 1) of each sampler above (SD3 eq. 19-21)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if density == "uniform":
        return torch.ones_like(t)
    if density == "logit_normal":
        z = (torch.log(t) - torch.log1p(-t) - logit_mean) / logit_std
        return torch.exp(-0.5 * z ** 2) / (logit_std * math.sqrt(2 * math.pi) * t * (1 - t))
    if density == "mode":
        _check_mode_scale(mode_scale)
        u = mode_inverse(t, mode_scale)
        df = -1 - mode_scale + mode_scale * math.pi / 2 * torch.sin(math.pi * u)  # f_mode'(u)
        return 1 / df.abs()
    if density == "cosmap":
        return 2 / (math.pi - 2 * math.pi * t + 2 * math.pi * t ** 2)
    raise ValueError(f"unknown timestep density {density!r}; valid: {list(DENSITIES)}")


def resolution_shift(height: int, width: int | None = None, base_height: int = 256,
                     base_width: int | None = None) -> float:
    """SD3 eq. 23 shift alpha = sqrt(m / n) for m pixels (or latent cells) against a base of n:
    same-SNR timesteps at the new resolution are t_m = alpha t_n / (1 + (alpha - 1) t_n)."""
    width = height if width is None else width
    base_width = base_height if base_width is None else base_width
    if min(height, width, base_height, base_width) <= 0:
        raise ValueError("resolution_shift needs positive sizes")
    return math.sqrt(height * width / (base_height * base_width))


# ----------------------------------------------------------------------------------------------- loss
class DiffusionLoss:
    """E_{t ~ pi, eps} w(t) || net(x_t, signal(t), **cond) - target(kind, x0, eps, t) ||^2 (SD3 eq. 5 in
    target form), for any schedule and prediction kind.

    shift: SD3 resolution shift applied to the sampled t (default: schedule.shift for rectified
    flow, else 1). t is mapped into [t_min, schedule.t_max]; on a Discrete schedule it is rounded
    to the integer training timesteps. weighting="min_snr" gives min(SNR, gamma) weights in x0
    units (Hang et al. 2023), for any kind. time_input: the signal the network sees, with the same
    default as wrap_model ("auto": the training timestep N t - 1 on a Discrete table, else 1000 t)."""

    def __init__(self, schedule: Schedule, prediction: str = "velocity", density: str = "logit_normal", *,
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 shift: float | None = None, weighting: str = "none", min_snr_gamma: float = 5.0,
                 time_input="auto", t_min: float = 0.0):
        self.schedule, self.prediction = schedule, check_prediction(prediction)
        if density not in DENSITIES:
            raise ValueError(f"unknown timestep density {density!r}; valid: {list(DENSITIES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; valid: {list(WEIGHTINGS)}")
        if not callable(time_input) and time_input not in TIME_SIGNALS:
            raise ValueError(f"unknown time_input {time_input!r}; valid: {list(TIME_SIGNALS)} or a callable")
        if density == "mode":
            _check_mode_scale(mode_scale)
        self.density = density
        self.density_kwargs = {"logit_mean": logit_mean, "logit_std": logit_std, "mode_scale": mode_scale}
        if shift is None:
            shift = schedule.shift if isinstance(schedule, RectifiedFlow) else 1.0
        self.shift = float(shift)
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0 <= t_min < schedule.t_max:
            raise ValueError(f"t_min must lie in [0, t_max={schedule.t_max}), got {t_min}")
        self.weighting, self.min_snr_gamma = weighting, float(min_snr_gamma)
        self.time_input, self.t_min = time_input, float(t_min)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device="cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Training times: density sample -> resolution shift -> [t_min, t_max] (-> integer timesteps)."""
        t = sample_timesteps(self.density, n, generator, dtype=torch.float64, **self.density_kwargs)
        if self.shift != 1.0:
            t = shift_time(t, self.shift)
        t = self.t_min + (self.schedule.t_max - self.t_min) * t
        if isinstance(self.schedule, Discrete):
            N = self.schedule.num_train_timesteps
            t = self.schedule.t_from_timestep((torch.ceil(t * N) - 1).clamp(0, N - 1))
        return t.to(device=device, dtype=dtype)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight w(t), shape (B,)."""
        if self.weighting == "none":
            return torch.ones_like(t)
        # error in the target per unit error in x0 at fixed x_t: c = d target / d x0 with eps = (x_t - a x0) / s
        t64 = t.double().clamp(1e-4, self.schedule.t_max)
        a, s = self.schedule.alpha(t64), self.schedule.sigma(t64)
        one = torch.ones_like(t64)
        c = target(self.prediction, one, -a / s, t64, self.schedule) - target(self.prediction, 0 * one, 0 * one, t64,
                                                                              self.schedule)
        snr = (a / s) ** 2
        return (snr.clamp(max=self.min_snr_gamma) / c ** 2).to(t.dtype)

    def __call__(self, net: Callable, x0: torch.Tensor, *, t: torch.Tensor | None = None,
                 eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 reduction: str = "mean", **cond) -> torch.Tensor:
        """Loss for a batch x0 (B, ...); t and eps are drawn (from `generator`) unless given."""
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, generator, x0.device, dtype=torch.float64)
        # the schedule is evaluated at float64 t (a float32 t misses the knots of a Discrete table, whose
        # slope jumps there); the network gets the same float32 time signal as ever
        t = torch.as_tensor(t, device=x0.device, dtype=torch.float64)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                              device=generator.device if generator is not None else x0.device).to(x0.device)
        x_t = self.schedule.add_noise(x0, eps, t).to(x0.dtype)
        out = _output_tensor(net(x_t, time_signal(self.schedule, t.float(), self.time_input), **cond), x_t)
        if out.shape != x0.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} != input shape {tuple(x0.shape)}")
        tgt = target(self.prediction, x0.float(), eps.float(), t, self.schedule)
        per_sample = (out.float() - tgt).pow(2).flatten(1).mean(1) * self.weights(t).float()
        if reduction == "none":
            return per_sample
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return per_sample.mean()
