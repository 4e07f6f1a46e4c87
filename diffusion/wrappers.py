"""Wrappers at the edge: any network becomes model_fn(x_t, t, **cond) -> (x0, eps).

Samplers only ever see continuous t in [0, 1] of shape (B,); the wrapper decides the time signal
the network was trained with, and converts its output kind through diffusion.prediction.
"""
from __future__ import annotations

from typing import Callable

import torch

from .prediction import check_prediction, to_x0_eps
from .schedule import Discrete, Schedule, append_dims

TIME_SIGNALS = ("auto", "timestep", "t", "t1000", "log_snr", "edm_sigma")


def time_signal(schedule: Schedule, t: torch.Tensor, kind="auto") -> torch.Tensor:
    """What the network sees at time t: a training timestep (discrete tables), 1000 t (SD3 / DiT),
    t, log-SNR, or EDM sigma = sigma / alpha; `kind` may also be a callable t -> signal."""
    if callable(kind):
        return kind(t)
    if kind == "auto":
        kind = "timestep" if isinstance(schedule, Discrete) else "t1000"
    if kind == "timestep":
        if not isinstance(schedule, Discrete):
            raise ValueError("time_signal='timestep' needs a Discrete schedule; use 't1000' or 't'")
        return schedule.timestep_from_t(t)
    if kind == "t":
        return t
    if kind == "t1000":
        return 1000 * t
    if kind == "log_snr":
        return schedule.log_snr(t)
    if kind == "edm_sigma":
        return schedule.edm_sigma(t)
    raise ValueError(f"unknown time_signal {kind!r}; valid: {list(TIME_SIGNALS)} or a callable")


def _output_tensor(out, x: torch.Tensor) -> torch.Tensor:
    """Unwrap diffusers outputs (.sample / tuples) and drop a learned-variance half."""
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        out = out[:, : x.shape[1]]  # learned-range variance models (iDDPM): keep the mean part
    return out


def wrap_model(net: Callable, schedule: Schedule, prediction: str = "eps", time_input="auto",
               **fixed_kwargs) -> Callable:
    """Turn `net(x_t, signal, **cond)` predicting `prediction` into model_fn(x_t, t, **cond) -> (x0, eps)."""
    prediction = check_prediction(prediction)
    if not callable(time_input) and time_input not in TIME_SIGNALS:
        raise ValueError(f"unknown time_input {time_input!r}; valid: {list(TIME_SIGNALS)} or a callable")

    def model_fn(x_t, t, **cond):
        signal = time_signal(schedule, t, time_input)
        out = _output_tensor(net(x_t, signal, **fixed_kwargs, **cond), x_t)
        return to_x0_eps(prediction, out.to(x_t.dtype), x_t, t, schedule)

    model_fn.schedule, model_fn.prediction = schedule, prediction
    return model_fn


def _cat_cond(cond: dict, uncond: dict) -> dict:
    """Stack conditional and unconditional keyword inputs along the batch (tensors only)."""
    merged = {}
    for key in set(cond) | set(uncond):
        c, u = cond.get(key, uncond.get(key)), uncond.get(key, cond.get(key))
        if torch.is_tensor(c):
            if c.shape[1:] != u.shape[1:]:
                raise ValueError(f"cond and uncond {key!r} shapes differ: {tuple(c.shape)} vs {tuple(u.shape)}")
            if u.shape[0] != c.shape[0]:
                u = u.expand(c.shape[0], *u.shape[1:])
            merged[key] = torch.cat([c, u])
        else:
            merged[key] = c
    return merged


def classifier_free_guidance(model_fn: Callable, scale: float, uncond: dict | None = None,
                             rescale: float = 0.0, batched: bool = True) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale
    (Lin et al. 2024, eq. 15-16, applied to the x0 prediction).

    `uncond` holds the keyword inputs that replace the conditional ones for the unconditional
    branch (e.g. {"encoder_hidden_states": empty_prompt}); batched=True runs both in one call."""
    uncond = uncond or {}
    if not scale >= 0:  # also NaN
        raise ValueError(f"guidance scale must be >= 0 (1: no guidance, 0: the unconditional model), got {scale}")
    if rescale < 0 or rescale > 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")

    def guided(x_t, t, **cond):
        if scale == 1.0:
            return model_fn(x_t, t, **cond)
        b = x_t.shape[0]
        if batched:
            x0, eps = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), **_cat_cond(cond, uncond))
            (x0_c, x0_u), (eps_c, eps_u) = x0.split(b), eps.split(b)
        else:
            x0_c, eps_c = model_fn(x_t, t, **cond)
            x0_u, eps_u = model_fn(x_t, t, **{**cond, **uncond})
        x0 = x0_u + scale * (x0_c - x0_u)
        eps = eps_u + scale * (eps_c - eps_u)
        if rescale > 0:
            dims = tuple(range(1, x_t.ndim))
            factor = x0_c.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True)
            x0_new = rescale * x0 * factor + (1 - rescale) * x0
            # keep x_t = alpha x0 + sigma eps: move the change in x0 into eps
            schedule = model_fn.schedule
            a, s = append_dims(schedule.alpha(t), x_t), append_dims(schedule.sigma(t), x_t)
            eps = eps - a / s * (x0_new - x0)
            x0 = x0_new
        return x0, eps

    guided.schedule = getattr(model_fn, "schedule", None)
    guided.prediction = getattr(model_fn, "prediction", None)
    return guided
