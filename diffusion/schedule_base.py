"""The base of the noise-schedule core (diffusion.schedule): the convention, the time checks and helpers, and Schedule,
which derives everything (log-SNR, EDM sigma, SDE drift / diffusion, prior std, add_noise) from a family's alpha, sigma,
their derivatives and t_from_log_snr, once. The families: diffusion.schedule (continuous) and
diffusion.schedule_discrete (DDPM tables); import them all from diffusion.schedule.

Convention: continuous time t in [0, 1], t = 0 is data, x_t = alpha(t) * x0 + sigma(t) * eps.
"""
from __future__ import annotations

import torch

__all__ = ["Tensor", "append_dims", "shift_time", "Schedule"]

Tensor = torch.Tensor


def append_dims(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample (B,) or scalar tensor so it broadcasts against x (B, ...), in x's dtype:
    pass an x of at least float32 where v are schedule coefficients (they must not be rounded to half)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def _check_t(t) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else None)
    if not torch.is_floating_point(t):
        t = t.double()
    elif t.dtype in (torch.float16, torch.bfloat16):  # schedules are never evaluated in half precision
        t = t.float()
    if torch.any((t < 0) | (t > 1)) or torch.any(torch.isnan(t)):
        raise ValueError(f"time t must lie in [0, 1] (t = 0 is data); got min {t.min().item():.4g}, "
                         f"max {t.max().item():.4g}")
    return t


class Schedule:
    """Base class: subclasses define alpha, sigma, d_alpha, d_sigma and t_from_log_snr."""

    name = "schedule"
    t_max = 1.0  # largest time samplers start from (where the model is still usable)

    # --- to implement -----------------------------------------------------------------------
    def _alpha(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _sigma(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _d_alpha(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _d_sigma(self, t: Tensor) -> Tensor: raise NotImplementedError
    def t_from_log_snr(self, lam: Tensor) -> Tensor: raise NotImplementedError

    # --- public, validated ------------------------------------------------------------------
    def alpha(self, t) -> Tensor:
        return self._alpha(_check_t(t))

    def sigma(self, t) -> Tensor:
        return self._sigma(_check_t(t))

    def d_alpha(self, t) -> Tensor:
        """d alpha / dt."""
        return self._d_alpha(_check_t(t))

    def d_sigma(self, t) -> Tensor:
        """d sigma / dt."""
        return self._d_sigma(_check_t(t))

    # --- derived ------------------------------------------------------------------------------
    def log_snr(self, t) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2); +inf at clean data, -inf at pure noise."""
        t = _check_t(t)
        return 2 * (torch.log(self._alpha(t)) - torch.log(self._sigma(t)))

    def edm_sigma(self, t) -> Tensor:
        """Noise level of the scaled variable x_t / alpha (Karras et al. 2022): sigma / alpha."""
        t = _check_t(t)
        return self._sigma(t) / self._alpha(t)

    def t_from_edm_sigma(self, s) -> Tensor:
        s = torch.as_tensor(s, dtype=torch.float64) if not torch.is_tensor(s) else s
        return self.t_from_log_snr(-2 * torch.log(s))

    def drift(self, t) -> Tensor:
        """SDE drift coefficient f(t) = d log alpha / dt of dx = f x dt + g dw (Song et al. 2021)."""
        t = _check_t(t)
        return self._d_alpha(t) / self._alpha(t)

    def _d_sigma_sq(self, t: Tensor) -> Tensor:
        """d sigma^2 / dt; overridden where sigma(0) = 0 meets d sigma(0) = inf so the t = 0 limit is exact."""
        return 2 * self._sigma(t) * self._d_sigma(t)

    def diffusion_sq(self, t) -> Tensor:
        """g(t)^2 = d sigma^2/dt - 2 f sigma^2, the diffusion that yields these marginals."""
        t = _check_t(t)
        return self._d_sigma_sq(t) - 2 * self._d_alpha(t) / self._alpha(t) * self._sigma(t) ** 2

    def prior_std(self, t=None) -> float:
        """Std of x_t for unit-variance data, sqrt(alpha^2 + sigma^2): the scale of x_T."""
        t = self.t_max if t is None else t
        t = _check_t(torch.tensor(float(t), dtype=torch.float64))
        return float(torch.sqrt(self._alpha(t) ** 2 + self._sigma(t) ** 2))

    def add_noise(self, x0: Tensor, eps: Tensor, t) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps with t of shape (B,) or scalar; computed in at least float32,
        returned in the inputs' dtype."""
        t = _check_t(torch.as_tensor(t, device=x0.device))
        dtype = torch.promote_types(x0.dtype, eps.dtype)
        x = x0.to(torch.promote_types(dtype, torch.float32))
        return (append_dims(self._alpha(t), x) * x + append_dims(self._sigma(t), x) * eps).to(dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict:
        return {}


class _VariancePreserving(Schedule):
    """alpha^2 + sigma^2 = 1, so d sigma^2 / dt = -2 alpha alpha' (finite at t = 0, where sigma' is not)."""

    def _d_sigma_sq(self, t):
        return -2 * self._alpha(t) * self._d_alpha(t)
