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


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """Conversions run in at least float32: half-precision inputs are upcast, results cast back."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.promote_types(dtype, torch.float32)


def _coefs(schedule: Schedule, t, x: torch.Tensor, derivatives: bool = False):
    """alpha, sigma (and d_alpha, d_sigma when asked) at t, evaluated in float64 and shaped to broadcast
    against x in x's dtype (float32 or float64: callers upcast half-precision x first)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    coefs = (schedule.alpha(t), schedule.sigma(t))
    if derivatives:
        coefs += (schedule.d_alpha(t), schedule.d_sigma(t))
    return tuple(append_dims(c, x) for c in coefs)


def to_x0_eps(kind: str, output: torch.Tensor, x_t: torch.Tensor, t, schedule: Schedule):
    """Convert a model output of `kind` at (x_t, t) into (x0, eps), computed in at least float32 and
    returned in the inputs' dtype."""
    kind = check_prediction(kind)
    if output.shape != x_t.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} != x_t shape {tuple(x_t.shape)}")
    dtype, work = torch.promote_types(output.dtype, x_t.dtype), _compute_dtype(output, x_t)
    out, x = output.to(work), x_t.to(work)
    if kind == "velocity":
        a, s, da, ds = _coefs(schedule, t, x, derivatives=True)
        det = a * ds - s * da  # solve [a s; da ds] [x0; eps] = [x_t; u]
        x0, eps = (ds * x - s * out) / det, (a * out - da * x) / det
    else:
        a, s = _coefs(schedule, t, x)
        if kind == "eps":
            x0, eps = (x - s * out) / a, out
        elif kind == "x0":
            x0, eps = out, (x - a * out) / s
        elif kind == "v":
            norm = a ** 2 + s ** 2
            x0, eps = (a * x - s * out) / norm, (s * x + a * out) / norm
        else:  # score
            eps = -s * out
            x0 = (x - s * eps) / a
    return x0.to(dtype), eps.to(dtype)


def target(kind: str, x0: torch.Tensor, eps: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
    """Training target of `kind` built from (x0, eps) at time t, computed in at least float32 and
    returned in the inputs' dtype."""
    kind = check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    dtype, work = torch.promote_types(x0.dtype, eps.dtype), _compute_dtype(x0, eps)
    x0, eps = x0.to(work), eps.to(work)
    if kind == "velocity":
        _, _, da, ds = _coefs(schedule, t, x0, derivatives=True)
        return (da * x0 + ds * eps).to(dtype)
    a, s = _coefs(schedule, t, x0)
    if kind == "v":
        return (a * eps - s * x0).to(dtype)
    return (-eps / s).to(dtype)
