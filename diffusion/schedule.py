"""The one noise-schedule core: every alpha/sigma formula in the project lives here.

Convention: continuous time t in [0, 1], t = 0 is data, x_t = alpha(t) * x0 + sigma(t) * eps.
A schedule implements alpha, sigma, their time derivatives and the inverse t_from_log_snr;
everything else (log-SNR, SDE drift/diffusion, EDM sigma, add_noise) is derived once, here.
"""
from __future__ import annotations

import math

import torch

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

