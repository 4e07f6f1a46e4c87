"""DDPM beta tables as a schedule (the discrete family of the noise-schedule core): the beta tables of Ho et al. 2020 /
Stable Diffusion / Nichol & Dhariwal 2021, zero-terminal-SNR rescaling (Lin et al. 2024) and Discrete, which maps
integer timesteps n <-> t = (n + 1) / N. Import from diffusion.schedule (re-exported there).
"""
from __future__ import annotations

import math

import torch

from .schedule_base import Tensor, _VariancePreserving

__all__ = ["BETA_SCHEDULES", "betas_for", "rescale_zero_terminal_snr", "Discrete"]


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> tuple[Tensor, Tensor]:
    """Piecewise-linear f(x) through increasing knots xp, and its slope (right segment at knots)."""
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    slope = (f1 - f0) / (x1 - x0)
    return f0 + (x - x0) * slope, slope


def betas_for(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
              beta_end: float = 0.02) -> Tensor:
    """DDPM beta tables (Ho et al. 2020; Stable Diffusion; Nichol & Dhariwal 2021), float32 like
    the tables the public checkpoints were trained with."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {sorted(BETA_SCHEDULES)}")


BETA_SCHEDULES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (None, None)}


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift/scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2024, Alg. 1)."""
    a = alphas_cumprod.double().sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    return ((a - aT) * a0 / (a0 - aT)) ** 2


class Discrete(_VariancePreserving):
    """A DDPM beta table as a schedule: integer timestep n <-> t = (n + 1) / N, t = 0 is clean data.

    Between knots alpha_bar = alpha^2 is linear in t, so every table value is hit exactly and a
    pretrained DDPM / Stable Diffusion model is this schedule evaluated on its grid."""

    name = "discrete"

    def __init__(self, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                 beta_start: float | None = None, beta_end: float | None = None,
                 rescale_betas_zero_snr: bool = False, trained_betas=None):
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float32)
            beta_schedule = "trained"
        else:
            if beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {sorted(BETA_SCHEDULES)}")
            d0, d1 = BETA_SCHEDULES[beta_schedule]
            beta_start = d0 if beta_start is None else beta_start
            beta_end = d1 if beta_end is None else beta_end
            betas = betas_for(beta_schedule, num_train_timesteps, beta_start or 0.0, beta_end or 0.0)
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, beta_start, beta_end
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        ab = torch.cumprod(1.0 - betas, dim=0).double()
        if rescale_betas_zero_snr:
            ab = rescale_zero_terminal_snr(ab)
        self.num_train_timesteps = n = len(betas)
        self.alphas_cumprod = ab  # float64, index = integer timestep
        self._knots = torch.arange(n + 1, dtype=torch.float64) / n
        self._ab = torch.cat([torch.ones(1, dtype=torch.float64), ab])
        self._cache: dict = {}

    def _tables(self, device) -> tuple[Tensor, Tensor]:
        """(knots, alpha_bar) in float64 on `device`: in half precision the 1001 knots collide near t = 1."""
        key = torch.device(device)
        if key not in self._cache:
            self._cache[key] = (self._knots.to(key), self._ab.to(key))
        return self._cache[key]

    def _alpha_bar(self, t):
        """alpha_bar and its slope at t, interpolated in float64."""
        knots, ab = self._tables(t.device)
        return _interp(t.to(torch.float64), knots, ab)

    @staticmethod
    def _like(v: Tensor, t: Tensor) -> Tensor:
        return v.to(torch.promote_types(t.dtype, torch.float32))

    def _alpha(self, t):
        return self._like(self._alpha_bar(t)[0].sqrt(), t)

    def _sigma(self, t):
        return self._like((1 - self._alpha_bar(t)[0]).clamp_min(0).sqrt(), t)

    def _d_alpha(self, t):
        ab, slope = self._alpha_bar(t)
        return self._like(slope / (2 * ab.sqrt()), t)

    def _d_sigma(self, t):
        ab, slope = self._alpha_bar(t)
        return self._like(-slope / (2 * (1 - ab).sqrt()), t)

    def t_from_log_snr(self, lam):
        knots, ab = self._tables(lam.device)
        # alpha_bar decreases with t: interpolate t over the flipped (increasing) table.
        return self._like(_interp(torch.sigmoid(lam.to(torch.float64)), ab.flip(0), knots.flip(0))[0], lam)

    def t_from_timestep(self, timestep) -> Tensor:
        return (torch.as_tensor(timestep, dtype=torch.float64) + 1) / self.num_train_timesteps

    def timestep_from_t(self, t: Tensor) -> Tensor:
        """The (possibly fractional) training timestep a network sees at time t."""
        return t * self.num_train_timesteps - 1

    def config(self):
        return {"beta_schedule": self.beta_schedule, "num_train_timesteps": self.num_train_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end,
                "rescale_betas_zero_snr": self.rescale_betas_zero_snr}
