"""Every parameterization converts through (x0, eps): 2n conversions instead of n(n-1).

Kinds, with x_t = alpha x0 + sigma eps:
  eps       the noise eps (Ho et al. 2020)
  x0        the clean sample
  v         alpha eps - sigma x0 (Salimans & Ho 2022)
  velocity  dx_t/dt = alpha' x0 + sigma' eps (flow matching; for rectified flow eps - x0, as SD3)
  score     grad log p_t(x_t) = -eps / sigma (Song et al. 2021)
"""
from __future__ import annotations

import torch

from .schedule import Schedule, append_dims

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")
_DIFFUSERS_NAMES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "velocity"}


def check_prediction(kind: str) -> str:
    """Validate a prediction kind (diffusers' names epsilon/sample/v_prediction are accepted)."""
    kind = _DIFFUSERS_NAMES.get(kind, kind)
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction kind {kind!r}; valid: {list(PREDICTIONS)} "
                         f"(or diffusers' {sorted(_DIFFUSERS_NAMES)})")
    return kind


def _coefs(schedule: Schedule, t, x: torch.Tensor, derivatives: bool = False):
    """alpha, sigma (and d_alpha, d_sigma when asked) at t, shaped to broadcast against x."""
    t = torch.as_tensor(t, device=x.device)
    t = t.to(x.dtype) if torch.is_floating_point(x) else t
    coefs = (schedule.alpha(t), schedule.sigma(t))
    if derivatives:
        coefs += (schedule.d_alpha(t), schedule.d_sigma(t))
    return tuple(append_dims(c, x) for c in coefs)


def to_x0_eps(kind: str, output: torch.Tensor, x_t: torch.Tensor, t, schedule: Schedule):
    """Convert a model output of `kind` at (x_t, t) into (x0, eps)."""
    kind = check_prediction(kind)
    if output.shape != x_t.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} != x_t shape {tuple(x_t.shape)}")
    if kind == "velocity":
        a, s, da, ds = _coefs(schedule, t, x_t, derivatives=True)
        det = a * ds - s * da  # solve [a s; da ds] [x0; eps] = [x_t; u]
        return (ds * x_t - s * output) / det, (a * output - da * x_t) / det
    a, s = _coefs(schedule, t, x_t)
    if kind == "eps":
        return (x_t - s * output) / a, output
    if kind == "x0":
        return output, (x_t - a * output) / s
    if kind == "v":
        norm = a ** 2 + s ** 2
        return (a * x_t - s * output) / norm, (s * x_t + a * output) / norm
    eps = -s * output  # score
    return (x_t - s * eps) / a, eps


def target(kind: str, x0: torch.Tensor, eps: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
    """Training target of `kind` built from (x0, eps) at time t."""
    kind = check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "velocity":
        _, _, da, ds = _coefs(schedule, t, x0, derivatives=True)
        return da * x0 + ds * eps
    a, s = _coefs(schedule, t, x0)
    if kind == "v":
        return a * eps - s * x0
    return -eps / s
