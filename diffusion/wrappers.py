"""Wrappers at the edge: any network becomes model_fn(x_t, t, **cond) -> (x0, eps).

Samplers only ever see continuous t in [0, 1] of shape (B,); the wrapper decides the time signal
the network was trained with, and converts its output kind through diffusion.prediction.
"""
from __future__ import annotations

from typing import Callable

import torch

from .prediction import check_prediction, target, to_x0_eps
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


INPUT_SCALINGS = ("none", "edm")


def _edm_input(x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """x_t / alpha(t), the EDM variable whose noise level is sigma / alpha (Karras et al. 2022), in >= float32."""
    alpha = schedule.alpha(t)
    if bool((alpha == 0).any()):
        raise ValueError(f"input_scaling='edm' divides x_t by alpha(t), which is 0 at t={float(t.max()):.4g}: "
                         f"start the grid where alpha > 0 (e.g. sigmas= / timesteps= below the schedule's t_max)")
    wide = x_t.to(torch.promote_types(x_t.dtype, torch.float32))
    return (wide / append_dims(alpha, wide)).to(x_t.dtype)


def wrap_model(net: Callable, schedule: Schedule, prediction: str = "eps", time_input="auto",
               input_scaling: str = "none", **fixed_kwargs) -> Callable:
    """Turn `net(x_t, signal, **cond)` predicting `prediction` into model_fn(x_t, t, **cond) -> (x0, eps).

    input_scaling="edm" hands the network x_t / alpha(t) instead of x_t: the input of a k-diffusion / EDM
    denoiser D(x / alpha, sigma / alpha), which then runs on any schedule (VP included); see wrap_kdiffusion."""
    prediction = check_prediction(prediction)
    if not callable(time_input) and time_input not in TIME_SIGNALS:
        raise ValueError(f"unknown time_input {time_input!r}; valid: {list(TIME_SIGNALS)} or a callable")
    if input_scaling not in INPUT_SCALINGS:
        raise ValueError(f"unknown input_scaling {input_scaling!r}; valid: {list(INPUT_SCALINGS)}")

    def model_fn(x_t, t, **cond):
        signal = time_signal(schedule, t, time_input)
        x_in = _edm_input(x_t, t, schedule) if input_scaling == "edm" else x_t
        out = _output_tensor(net(x_in, signal, **fixed_kwargs, **cond), x_t)
        return to_x0_eps(prediction, out.to(x_t.dtype), x_t, t, schedule)

    model_fn.schedule, model_fn.prediction = schedule, prediction
    return model_fn


def wrap_kdiffusion(denoiser: Callable, schedule: Schedule, **fixed_kwargs) -> Callable:
    """A k-diffusion-style denoiser D(x~, sigma~, **cond) -> x0, with x~ = x_t / alpha and sigma~ = sigma / alpha
    (Karras et al. 2022), as model_fn(x_t, t, **cond) -> (x0, eps) on any schedule."""
    return wrap_model(denoiser, schedule, prediction="x0", time_input="edm_sigma", input_scaling="edm", **fixed_kwargs)


def _cat_branch(key: str, c, u):
    """[cond | uncond] along the batch for one keyword input: tensors, and lists / tuples / dicts of them
    (one condition per ControlNet, SDXL's added_cond_kwargs); other values must agree between the branches."""
    if torch.is_tensor(c) and torch.is_tensor(u):
        if c.ndim == 0:
            return c
        if c.shape[1:] != u.shape[1:]:
            raise ValueError(f"cond and uncond {key!r} shapes differ: {tuple(c.shape)} vs {tuple(u.shape)}")
        if u.shape[0] != c.shape[0]:
            u = u.expand(c.shape[0], *u.shape[1:])
        return torch.cat([c, u])
    if isinstance(c, (list, tuple)) and isinstance(u, (list, tuple)):
        if len(c) != len(u):
            raise ValueError(f"cond and uncond {key!r} have {len(c)} and {len(u)} entries")
        return type(c)(_cat_branch(f"{key}[{i}]", a, b) for i, (a, b) in enumerate(zip(c, u)))
    if isinstance(c, dict) and isinstance(u, dict):
        return {k: _cat_branch(f"{key}[{k!r}]", c.get(k, u.get(k)), u.get(k, c.get(k))) for k in {**c, **u}}
    if torch.is_tensor(c) or torch.is_tensor(u) or type(c) is not type(u):
        raise ValueError(f"cond and uncond {key!r} differ in type: {type(c).__name__} vs {type(u).__name__}")
    return c


def _cat_cond(cond: dict, uncond: dict) -> dict:
    """Stack conditional and unconditional keyword inputs along the batch (uncond falls back to cond per key)."""
    return {key: _cat_branch(key, cond.get(key, uncond.get(key)), uncond.get(key, cond.get(key)))
            for key in {**cond, **uncond}}


RESCALE_KINDS = ("output", "eps", "x0", "v", "velocity")


def _rescale(out: torch.Tensor, out_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, Sec. 3.4): match the per-sample std of the conditional output, mix by phi."""
    dims = tuple(range(1, out.ndim))
    factor = out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
    return phi * out * factor + (1 - phi) * out


def classifier_free_guidance(model_fn: Callable, scale: float, uncond: dict | None = None,
                             rescale: float = 0.0, batched: bool = True, rescale_kind: str = "output") -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2024, Sec. 3.4).

    `uncond` holds the keyword inputs that replace the conditional ones for the unconditional
    branch (e.g. {"encoder_hidden_states": empty_prompt}); batched=True runs both in one call.
    `rescale` (phi) acts on `rescale_kind`: "output" is the network's own output kind (model_fn.prediction:
    eps for eps-models, v for v-models), as diffusers' rescale_noise_cfg; "x0", "eps", "v", "velocity" pick
    a kind explicitly. The (x0, eps) pair stays consistent with x_t."""
    uncond = uncond or {}
    if not scale >= 0:  # also NaN
        raise ValueError(f"guidance scale must be >= 0 (1: no guidance, 0: the unconditional model), got {scale}")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if rescale_kind not in RESCALE_KINDS:
        raise ValueError(f"unknown rescale_kind {rescale_kind!r}; valid: {list(RESCALE_KINDS)}")
    kind = getattr(model_fn, "prediction", None) if rescale_kind == "output" else rescale_kind
    if rescale > 0:
        if kind is None:
            raise ValueError("guidance rescale acts on the network's output kind, which this model_fn does not "
                             "state (no .prediction, as wrap_model sets): pass rescale_kind='eps' / 'v' / 'x0'")
        kind = check_prediction(kind)
        if getattr(model_fn, "schedule", None) is None:
            raise ValueError("guidance rescale needs model_fn.schedule (wrap_model sets it)")

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
        if rescale > 0:  # on the output kind, which is linear in (x0, eps): guiding it == guiding (x0, eps)
            schedule = model_fn.schedule
            out = _rescale(target(kind, x0, eps, t, schedule), target(kind, x0_c, eps_c, t, schedule), rescale)
            x0, eps = to_x0_eps(kind, out, x_t, t, schedule)
        return x0, eps

    guided.schedule = getattr(model_fn, "schedule", None)
    guided.prediction = getattr(model_fn, "prediction", None)
    return guided
