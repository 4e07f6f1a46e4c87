"""Continuous-time score SDEs derived from a diffusion schedule (Song et al. 2021, ICLR).

Forward SDE dx = f(t) x dt + g(t) dw with f = schedule.drift(t) = d log alpha / dt and
g^2 = schedule.diffusion_sq(t) = d sigma^2/dt - 2 f sigma^2: the SDE whose marginals are the
schedule's x_t = alpha x0 + sigma eps. VP (linear beta), VE, cosine, DDPM tables and rectified
flow are all schedules, so no coefficient formula is repeated here; sub-VP is the transform
sigma -> sigma_VP^2 of a variance-preserving schedule (diffusion.schedule.SubVP).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from diffusion.prediction import check_prediction, to_x0_eps
from diffusion.schedule import SCHEDULES, VE, Schedule, SubVP, VPLinear, append_dims, get_schedule

Tensor = torch.Tensor


def _is_ve(schedule: Schedule) -> bool:
    """VE-type: alpha is constant, so the drift vanishes."""
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64) * schedule.t_max
    return bool(torch.all(schedule.drift(t) == 0))


class SDE:
    """dx = f(t) x dt + g(t) dw whose marginals are `schedule`'s (Song et al. 2021, eq. 5).

    t_max: the start of sampling / end of the likelihood ODE (default schedule.t_max, or 1 - 1e-3
    where alpha(t_max) = 0, e.g. rectified flow, whose drift d log alpha/dt is infinite at t = 1).
    eps: the smallest time samplers integrate to before the final denoising step (score-SDE:
    1e-5 for VE-type SDEs, 1e-3 otherwise)."""

    def __init__(self, schedule: Schedule, t_max: float | None = None, eps: float | None = None):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"SDE needs a diffusion Schedule (e.g. get_schedule('vp')), got {type(schedule).__name__}")
        self.schedule = schedule
        self.kind = "sub_vp" if isinstance(schedule, SubVP) else "ve" if _is_ve(schedule) else "vp"
        if t_max is None:
            t_max = schedule.t_max
            if float(schedule.alpha(torch.tensor(t_max, dtype=torch.float64))) == 0:
                t_max = min(t_max, 1 - 1e-3)
        self.t_max = check_time("t_max", t_max, upper_inclusive=True)
        self.eps = check_time("eps", (1e-5 if self.kind == "ve" else 1e-3) if eps is None else eps)
        if self.eps >= self.t_max:
            raise ValueError(f"eps = {self.eps} must be smaller than t_max = {self.t_max}")
        f, g2 = self.coefficients(torch.tensor(self.t_max, dtype=torch.float64))
        if not (math.isfinite(float(f)) and math.isfinite(float(g2))):
            raise ValueError(f"SDE coefficients are not finite at t_max = {self.t_max} (alpha = 0 there?): "
                             f"pass a smaller t_max")

    # --- forward SDE -----------------------------------------------------------------------------------
    def coefficients(self, t) -> tuple[Tensor, Tensor]:
        """(f(t), g(t)^2) in float64, read from the schedule (finite at t = 0: its t -> 0+ limit)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.schedule.drift(t), self.schedule.diffusion_sq(t)

    def f(self, t) -> Tensor:
        return self.coefficients(t)[0]

    def g2(self, t) -> Tensor:
        return self.coefficients(t)[1]

    def drift(self, x: Tensor, t) -> Tensor:
        """Forward drift f(t) x for t scalar or (B,)."""
        return append_dims(self.f(t), x) * x

    def diffusion(self, t) -> Tensor:
        """g(t) = sqrt(diffusion_sq(t))."""
        return self.g2(t).clamp_min(0).sqrt()

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)): x_t | x0 ~ N(alpha x0, sigma^2 I)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.schedule.alpha(t), self.schedule.sigma(t)

    def marginal_prob(self, x0: Tensor, t) -> tuple[Tensor, Tensor]:
        """Mean alpha(t) x0 and std sigma(t) of p(x_t | x0) (score-SDE's marginal_prob)."""
        a, s = self.marginal(t)
        return append_dims(a, x0) * x0, s.to(x0)

    def transition(self, t_from: float, t_to: float) -> tuple[float, float]:
        """Exact forward kernel x_from = a x_to + G z for t_to < t_from: (a, G^2) =
        (alpha_from / alpha_to, sigma_from^2 - a^2 sigma_to^2); score-SDE's discretize() on any grid."""
        (a_i, s_i), (a_j, s_j) = (tuple(float(v) for v in self.marginal(t)) for t in (t_from, t_to))
        a = a_i / a_j
        return a, max(s_i ** 2 - a ** 2 * s_j ** 2, 0.0)

    # --- prior ------------------------------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Std of x_T for unit-variance data, sqrt(alpha^2 + sigma^2) at t_max (1 for VP, ~sigma_max for VE)."""
        return self.schedule.prior_std(self.t_max)

    def prior_sample(self, shape, generator=None, dtype=torch.float32, device="cpu") -> Tensor:
        """x_T ~ N(0, prior_std^2 I); generator: Generator, list (one per sample) or int seed(s)."""
        from .samplers import randn  # local: samplers imports this module
        return self.prior_std * randn(torch.empty(shape, dtype=dtype, device=device), generator)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) per sample, (B, ...) -> (B,)."""
        d = z[0].numel()
        s2 = self.prior_std ** 2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.reshape(z.shape[0], -1).pow(2).sum(1) / (2 * s2)

    # --- reverse time -----------------------------------------------------------------------------------
    def reverse(self, model_fn: Callable, prediction: str | None = None, cond: dict | None = None,
                probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, model_fn, prediction, cond, probability_flow)

    def __repr__(self):
        return f"SDE({self.schedule!r}, kind={self.kind!r}, t_max={self.t_max}, eps={self.eps})"


def check_time(name: str, t, upper_inclusive: bool = False) -> float:
    """Validate a time in (0, 1) (or (0, 1] for t_max)."""
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {t!r}") from None
    ok = 0 < t <= 1 if upper_inclusive else 0 < t < 1
    if not ok:
        raise ValueError(f"{name} must lie in (0, 1{']' if upper_inclusive else ')'}, got {t} "
                         f"(score-SDE uses eps = 1e-3 for VP, 1e-5 for VE)")
    return t


class ReverseSDE:
    """Reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar (Anderson 1982; Song et al. 2021, eq. 6)
    or, with probability_flow, the ODE dx = [f x - g^2 score / 2] dt (eq. 13); score = -eps / sigma.

    model_fn(x, t, **cond) returns (x0, eps), or a raw output of kind `prediction` (eps, x0, v,
    velocity, score) converted through diffusion.prediction. `nfe` counts model evaluations."""

    def __init__(self, sde: SDE, model_fn: Callable, prediction: str | None = None, cond: dict | None = None,
                 probability_flow: bool = False):
        self.sde, self.schedule = sde, sde.schedule
        self.probability_flow = bool(probability_flow)
        self.nfe, self.last_x0 = 0, None
        cond = cond or {}
        if prediction is not None:
            kind = check_prediction(prediction)
            self._fn = lambda x, t: to_x0_eps(kind, model_fn(x, t, **cond), x, t, sde.schedule)
        else:
            self._fn = lambda x, t: model_fn(x, t, **cond)

    def denoise(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """(x0, eps) at scalar time t, shape- and finiteness-checked."""
        self.nfe += 1
        t = float(t)
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # never a half-precision time
        x0, eps = self._fn(x, torch.full((x.shape[0],), t, dtype=t_dtype, device=x.device))
        if x0.shape != x.shape or eps.shape != x.shape:
            raise ValueError(f"model_fn returned shapes {tuple(x0.shape)}, {tuple(eps.shape)} for input {tuple(x.shape)}")
        if not (torch.isfinite(x0.detach()).all() and torch.isfinite(eps.detach()).all()):
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"the sampler state x is not finite at t = {t:.4g}: a previous sampler step diverged "
                    f"(its step size is too large: lower snr or use more steps)")
            raise FloatingPointError(
                f"model output is not finite at t = {t:.4g}: the network produced NaN/Inf (or an eps/score model "
                f"was evaluated where alpha(t) = 0; keep t_max < 1)")
        self.last_x0 = x0  # for callbacks
        return x0, eps

    def score(self, x: Tensor, t: float) -> Tensor:
        """grad log p_t(x) = -eps / sigma(t)."""
        return self.score_from_eps(self.denoise(x, t)[1], t)

    def score_from_eps(self, eps: Tensor, t: float) -> Tensor:
        return eps / -float(self.sde.marginal(t)[1])

    def drift(self, x: Tensor, t: float) -> Tensor:
        """f x - c g^2 score with c = 1 (reverse SDE) or 1/2 (probability-flow ODE)."""
        f, g2 = (float(v) for v in self.sde.coefficients(t))
        c = 0.5 if self.probability_flow else 1.0
        return f * x - (c * g2) * self.score(x, t)

    def diffusion(self, t: float) -> float:
        return 0.0 if self.probability_flow else float(self.sde.diffusion(t))


# --- construction by name --------------------------------------------------------------------------------
def VPSDE(beta_min: float = 0.1, beta_max: float = 20.0, **kw) -> SDE:
    """Continuous DDPM (Song et al. 2021, eq. 11): f = -beta(t)/2, g^2 = beta(t)."""
    return SDE(VPLinear(beta_min, beta_max), **kw)


def SubVPSDE(beta_min: float = 0.1, beta_max: float = 20.0, **kw) -> SDE:
    """sub-VP SDE (Song et al. 2021, eq. 29): f = -beta/2, g^2 = beta (1 - alpha^4)."""
    return SDE(SubVP(VPLinear(beta_min, beta_max)), **kw)


def VESDE(sigma_min: float = 0.01, sigma_max: float = 50.0, **kw) -> SDE:
    """NCSN as an SDE (Song et al. 2021, eq. 9): f = 0, g = sigma_min r^t sqrt(2 log r)."""
    return SDE(VE(sigma_min, sigma_max), **kw)


SDES = {"vp": VPSDE, "sub_vp": SubVPSDE, "ve": VESDE}
_SDE_ALIASES = {"vpsde": "vp", "subvp": "sub_vp", "subvpsde": "sub_vp", "vesde": "ve"}


def sde_names() -> list:
    return sorted(SDES) + sorted(_SDE_ALIASES) + sorted(k for k in SCHEDULES if k not in SDES)


def get_sde(name: str, t_max: float | None = None, eps: float | None = None, **schedule_kw) -> SDE:
    """SDE by name: vp, sub_vp, ve (score-SDE's three) or any diffusion schedule name (its VP-type SDE)."""
    key = _SDE_ALIASES.get(name, name)
    if key in SDES:
        return SDES[key](t_max=t_max, eps=eps, **schedule_kw)
    try:
        schedule = get_schedule(key, **schedule_kw)
    except ValueError:
        raise ValueError(f"unknown SDE {name!r}; valid: {sde_names()}") from None
    return SDE(schedule, t_max=t_max, eps=eps)


def as_sde(obj) -> SDE:
    """An SDE from an SDE, a diffusion Schedule (its marginal-matching SDE) or a name."""
    if isinstance(obj, SDE):
        return obj
    if isinstance(obj, Schedule):
        return SDE(obj)
    if isinstance(obj, str):
        return get_sde(obj)
    raise ValueError(f"expected an sde.SDE, a diffusion Schedule or a name in {sde_names()}, got {type(obj).__name__}")
