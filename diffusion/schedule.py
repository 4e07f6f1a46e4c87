"""The one noise-schedule core: every alpha/sigma formula in the project lives here, in schedule_base.py (Schedule:
what is derived from alpha and sigma) and in schedule_discrete.py (the DDPM tables), and is imported from here.

Convention: continuous time t in [0, 1], t = 0 is data, x_t = alpha(t) * x0 + sigma(t) * eps.
A schedule implements alpha, sigma, their time derivatives and the inverse t_from_log_snr;
everything else (log-SNR, SDE drift/diffusion, EDM sigma, add_noise) is derived once, in Schedule.
"""
from __future__ import annotations

import math

import torch

from .schedule_base import Schedule, _VariancePreserving, append_dims, shift_time
from .schedule_discrete import BETA_SCHEDULES, Discrete, betas_for, rescale_zero_terminal_snr

__all__ = ["Schedule", "append_dims", "shift_time", "VPLinear", "Cosine", "VE", "RectifiedFlow", "SubVP", "Discrete",
           "BETA_SCHEDULES", "betas_for", "rescale_zero_terminal_snr", "SCHEDULES", "ALIASES", "get_schedule"]


class VPLinear(_VariancePreserving):
    """Continuous linear-beta VP (Song et al. 2021): log alpha = -t^2 (b1 - b0)/4 - t b0 / 2."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def _sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def _d_alpha(self, t):
        return -0.5 * self._beta(t) * self._alpha(t)

    def _d_sigma(self, t):
        a2 = torch.exp(2 * self._log_alpha(t))
        return 0.5 * self._beta(t) * a2 / self._sigma(t)

    def t_from_log_snr(self, lam):
        # -2 log alpha = softplus(-lam) = t b0 + t^2 (b1 - b0) / 2, solved for t >= 0.
        d = self.beta_max - self.beta_min
        c = torch.nn.functional.softplus(-lam)
        return (torch.sqrt(self.beta_min ** 2 + 2 * d * c) - self.beta_min) / d

    def config(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


class Cosine(_VariancePreserving):
    """Cosine schedule (Nichol & Dhariwal 2021): alpha = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)).

    alpha(1) = 0, so samplers start at t_max = 0.9946 (as DPM-Solver does), where log-SNR ~ -9.6.
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, t_max: float = 0.9946):
        self.s, self.t_max = float(s), float(t_max)
        self._c = math.cos(math.pi / 2 * self.s / (1 + self.s))

    def _angle(self, t):
        return math.pi / 2 * (t + self.s) / (1 + self.s)

    def _alpha(self, t):
        return torch.cos(self._angle(t)) / self._c

    def _sigma(self, t):
        # 1 - alpha^2 = (cos^2 a0 - cos^2 a) / c^2 = sin(a - a0) sin(a + a0) / c^2 with a0 = angle(0):
        # no cancellation near t = 0
        a0 = math.pi / 2 * self.s / (1 + self.s)
        return torch.sqrt(torch.sin(math.pi / 2 * t / (1 + self.s)) * torch.sin(self._angle(t) + a0)) / self._c

    def _d_alpha(self, t):
        return -torch.sin(self._angle(t)) * (math.pi / 2 / (1 + self.s)) / self._c

    def _d_sigma(self, t):
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def t_from_log_snr(self, lam):
        alpha = torch.sqrt(torch.sigmoid(lam))
        return (torch.acos((alpha * self._c).clamp(-1, 1)) * (2 / math.pi) * (1 + self.s) - self.s).clamp(0, 1)

    def config(self):
        return {"s": self.s, "t_max": self.t_max}


class VE(Schedule):
    """Variance exploding (Song et al. 2021), alpha = 1, with the exact marginal of its SDE:
    sigma(t)^2 = sigma_min^2 (r^(2t) - 1), r = sigma_max / sigma_min, so t = 0 is clean data
    and g(t) = sigma_min r^t sqrt(2 log r) is score-SDE's diffusion."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_r = math.log(self.sigma_max / self.sigma_min)

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return self.sigma_min * torch.sqrt(torch.expm1(2 * self._log_r * t))

    def _d_alpha(self, t):
        return torch.zeros_like(t)

    def _d_sigma(self, t):
        return 0.5 * self._d_sigma_sq(t) / self._sigma(t)

    def _d_sigma_sq(self, t):
        return 2 * self.sigma_min ** 2 * self._log_r * torch.exp(2 * self._log_r * t)

    def t_from_log_snr(self, lam):
        return torch.log1p(torch.exp(-lam) / self.sigma_min ** 2) / (2 * self._log_r)

    def config(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class RectifiedFlow(Schedule):
    """Rectified flow (Liu et al. 2022; Esser et al. 2024): alpha = 1 - t, sigma = t.

    `shift` is the SD3 resolution shift applied to time grids and training densities
    (see shift_time); it does not change alpha/sigma."""

    name = "rectified_flow"

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = float(shift)

    def _alpha(self, t):
        return 1 - t

    def _sigma(self, t):
        return t.clone()

    def _d_alpha(self, t):
        return -torch.ones_like(t)

    def _d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_log_snr(self, lam):
        return torch.sigmoid(-lam / 2)

    def config(self):
        return {"shift": self.shift}


class SubVP(Schedule):
    """sub-VP marginals (Song et al. 2021, eq. 29): alpha of a VP schedule and sigma = 1 - alpha^2,
    i.e. sigma_sub = sigma_vp^2, so the SDE has the VP drift and g^2 = beta (1 - alpha^4)."""

    name = "sub_vp"

    def __init__(self, base: Schedule | None = None):
        base = VPLinear() if base is None else base
        if not isinstance(base, Schedule):
            raise ValueError(f"SubVP needs a diffusion Schedule, got {type(base).__name__}")
        t = torch.linspace(0.05, base.t_max, 7, dtype=torch.float64)
        if (base.alpha(t) ** 2 + base.sigma(t) ** 2 - 1).abs().max() > 1e-6:
            raise ValueError(f"sub-VP is defined from a variance-preserving schedule (alpha^2 + sigma^2 = 1); "
                             f"{base!r} is not: use VPLinear, Cosine or a Discrete beta table")
        self.base, self.t_max = base, base.t_max

    def _alpha(self, t):
        return self.base._alpha(t)

    def _sigma(self, t):
        return self.base._sigma(t) ** 2

    def _d_alpha(self, t):
        return self.base._d_alpha(t)

    def _d_sigma(self, t):
        return self.base._d_sigma_sq(t)  # sigma_sub = sigma_vp^2

    def _d_sigma_sq(self, t):
        return 2 * self._sigma(t) * self.base._d_sigma_sq(t)

    def t_from_log_snr(self, lam):
        # alpha / u = e^{lam/2} with u = sigma_vp^2 = 1 - alpha^2 gives u = 2 / (1 + sqrt(1 + 4 e^lam)) and
        # lam_vp = log(alpha^2 / u) = lam + log u; the log is taken stably on both sides of lam = 0.
        pos = lam.clamp_min(0)
        log_den = torch.where(lam > 0, pos / 2 + torch.log(torch.exp(-pos / 2) + torch.sqrt(torch.exp(-pos) + 4)),
                              torch.log1p(torch.sqrt(1 + 4 * torch.exp(lam.clamp_max(0)))))
        return self.base.t_from_log_snr(lam + math.log(2.0) - log_den)

    def config(self):
        return {"base": self.base}


SCHEDULES = {
    "vp_linear": VPLinear, "cosine": Cosine, "ve": VE, "rectified_flow": RectifiedFlow,
    "discrete": Discrete, "sub_vp": lambda **kw: SubVP(VPLinear(**kw)),
    "linear": lambda **kw: Discrete("linear", **kw),
    "scaled_linear": lambda **kw: Discrete("scaled_linear", **kw),
    "squaredcos_cap_v2": lambda **kw: Discrete("squaredcos_cap_v2", **kw),
}
ALIASES = {"vp": "vp_linear", "rf": "rectified_flow", "flow": "rectified_flow"}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name: vp_linear, cosine, ve, rectified_flow, discrete, or a beta table."""
    key = ALIASES.get(name, name)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES) + sorted(ALIASES)}")
    return SCHEDULES[key](**kwargs)

