"""diffusers schedulers -> this project's Schedule, prediction kind and time signal (the one place that reads them).

Every function takes the same inputs: a live scheduler object (its class is read from its type), a
pipeline object (its .scheduler), a config dict with "_class_name", a scheduler_config.json path, a
scheduler directory, or a pipeline directory with scheduler/scheduler_config.json. Unknown scheduler
classes and options that would change the process raise an error naming them; nothing falls back
to a default table silently.

    schedule = schedule_from_diffusers(pipe.scheduler)          # FlowMatchEuler(shift=3) -> RectifiedFlow(3)
    model_fn = wrap_model(net, schedule, prediction_from_diffusers(pipe.scheduler),
                          time_input=time_input_from_diffusers(pipe.scheduler))
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from .prediction import check_prediction
from .schedule import BETA_SCHEDULES, VE, Discrete, RectifiedFlow, Schedule

__all__ = ["SUPPORTED_SCHEDULERS", "load_scheduler_config", "schedule_from_diffusers", "prediction_from_diffusers",
           "time_input_from_diffusers", "dynamic_shift_mu"]

_TABLE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", trained_betas=None,
              prediction_type="epsilon", rescale_betas_zero_snr=False, use_flow_sigmas=False, flow_shift=1.0,
              use_dynamic_shifting=False, time_shift_type="exponential", timestep_type="discrete")
_SD_TABLE = dict(_TABLE, beta_start=0.00085, beta_end=0.012)  # classes whose defaults are SD's range
_FLOW = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
             base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
             time_shift_type="exponential")
_EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")
_VE = dict(num_train_timesteps=2000, sigma_min=0.01, sigma_max=1348.0)

# class name -> (family, the class's constructor defaults for the keys read here; checked against diffusers in tests)
SUPPORTED_SCHEDULERS = {
    **{name: ("table", _TABLE) for name in (
        "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "DDIMInverseScheduler",
        "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler", "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "RePaintScheduler")},
    **{name: ("table", _SD_TABLE) for name in (
        "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler")},
    **{name: ("table", dict(_SD_TABLE, beta_schedule="scaled_linear")) for name in ("LCMScheduler", "TCDScheduler")},
    **{name: ("flow", _FLOW) for name in (
        "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")},
    "ScoreSdeVeScheduler": ("ve", _VE),
    **{name: ("edm", _EDM) for name in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")},
}


def load_scheduler_config(source) -> dict:
    """The scheduler's config with "_class_name", from any of the inputs listed in the module docstring."""
    if not isinstance(source, (Mapping, str, Path)) and hasattr(getattr(source, "scheduler", None), "config"):
        source = source.scheduler  # a diffusers pipeline object
    if not isinstance(source, Mapping) and hasattr(source, "config") and isinstance(source.config, Mapping):
        return {**source.config, "_class_name": type(source).__name__}  # a live scheduler: the class is its type
    if isinstance(source, Mapping):
        cfg, where = dict(source), "the config dict"
    elif isinstance(source, (str, Path)):
        path = Path(source)
        files = [p for p in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json")
                 if p.is_file()]
        if not files:
            raise FileNotFoundError(f"no scheduler config at {path}: pass a scheduler object, a config dict, a "
                                    f"scheduler_config.json, or a diffusers pipeline directory containing "
                                    f"scheduler/scheduler_config.json")
        cfg, where = json.loads(files[0].read_text()), str(files[0])
    else:
        raise TypeError(f"cannot read a diffusers scheduler from {type(source).__name__}: pass a scheduler object, "
                        f"a config dict with '_class_name', a scheduler_config.json path or a pipeline directory")
    if "_class_name" not in cfg:
        raise ValueError(f"{where} has no '_class_name', so its scheduler family is unknown: pass the scheduler "
                         f"object itself (not scheduler.config) or add '_class_name', e.g. 'DDIMScheduler'")
    return cfg


def _resolve(source) -> tuple[str, str, dict]:
    """(class name, family, config with the class's defaults filled in); unknown classes raise."""
    cfg = load_scheduler_config(source)
    name = cfg["_class_name"]
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"unsupported diffusers scheduler {name!r}; supported: {sorted(SUPPORTED_SCHEDULERS)}")
    family, defaults = SUPPORTED_SCHEDULERS[name]
    cfg = {**defaults, **{k: v for k, v in cfg.items() if v is not None or k not in defaults}}
    if family == "table":
        if cfg.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"{name} with timestep_type={cfg['timestep_type']!r} feeds the network EDM-style "
                             f"log-sigma times and Karras sigmas; only timestep_type='discrete' is supported")
        if cfg.get("use_flow_sigmas"):
            family = "flow"  # DPM-Solver / UniPC / DEIS / SA-Solver in flow-matching mode
            cfg["shift"] = cfg.get("flow_shift", 1.0)
        elif cfg["trained_betas"] is None and cfg["beta_schedule"] not in BETA_SCHEDULES:
            raise ValueError(f"{name}: beta_schedule {cfg['beta_schedule']!r} is not supported; valid: "
                             f"{sorted(BETA_SCHEDULES)} (or pass trained_betas)")
    if family == "flow":
        for key in ("invert_sigmas", "shift_terminal"):
            if cfg.get(key):
                raise ValueError(f"{name} with {key}={cfg[key]!r} changes the sampling times in a way this project's "
                                 f"grids do not reproduce; supported: {key}=None/False")
        if cfg.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ValueError(f"{name}: unknown time_shift_type {cfg['time_shift_type']!r}; valid: exponential, linear")
    return name, family, cfg


def dynamic_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent mu of flow-matching dynamic shifting (Flux): linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return base_shift + slope * (image_seq_len - base_image_seq_len)


def _shift(name: str, cfg: dict, mu, image_seq_len) -> float:
    if not cfg.get("use_dynamic_shifting"):
        if mu is not None or image_seq_len is not None:
            raise ValueError(f"{name} has use_dynamic_shifting=False: mu / image_seq_len do not apply "
                             f"(its shift is {cfg['shift']})")
        return float(cfg["shift"])
    if mu is None:
        if image_seq_len is None:
            raise ValueError(f"{name} has use_dynamic_shifting=True: pass mu= or image_seq_len= (image tokens the "
                             f"transformer sees, e.g. (H / 16) * (W / 16) for Flux) to schedule_from_diffusers")
        if "base_shift" not in cfg:
            raise ValueError(f"{name} has no base_shift / max_shift to derive mu from image_seq_len: pass mu=")
        mu = dynamic_shift_mu(image_seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                              cfg["base_shift"], cfg["max_shift"])
    # exponential: exp(mu) / (exp(mu) + 1/t - 1) is the SD3 shift with s = exp(mu); linear: s = mu
    return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else float(mu)


def schedule_from_diffusers(source, *, mu: float | None = None, image_seq_len: int | None = None) -> Schedule:
    """Schedule of a diffusers scheduler: a Discrete beta table (DDPM / DDIM / Euler / DPM-Solver ... family,
    zero-terminal-SNR included), RectifiedFlow(shift) for flow matching (dynamic shifting needs `mu` or
    `image_seq_len`), VE for ScoreSdeVe and the EDM sigma schedule (alpha = 1, sigma(1) = sigma_max)."""
    name, family, cfg = _resolve(source)
    if family == "flow":
        return RectifiedFlow(shift=_shift(name, cfg, mu, image_seq_len))
    if mu is not None or image_seq_len is not None:
        raise ValueError(f"mu / image_seq_len apply to flow-matching dynamic shifting only, not to {name}")
    if family in ("ve", "edm"):
        # exact VE marginal sigma_min sqrt(r^(2t) - 1): pick r so that sigma(1) is the config's sigma_max
        return VE(cfg["sigma_min"], math.hypot(cfg["sigma_max"], cfg["sigma_min"]))
    return Discrete(beta_schedule=cfg["beta_schedule"], num_train_timesteps=cfg["num_train_timesteps"],
                    beta_start=cfg["beta_start"], beta_end=cfg["beta_end"],
                    rescale_betas_zero_snr=cfg.get("rescale_betas_zero_snr", False), trained_betas=cfg["trained_betas"])


def prediction_from_diffusers(source) -> str:
    """Output kind of the network a diffusers scheduler drives: eps / x0 / v from prediction_type, velocity
    for flow matching (noise - x0), score for ScoreSdeVe. EDM schedulers raise (preconditioned outputs)."""
    name, family, cfg = _resolve(source)
    if family == "flow":  # FlowMatch classes; DPM-Solver & co. with use_flow_sigmas keep their prediction_type
        return check_prediction(cfg["prediction_type"]) if "prediction_type" in cfg else "velocity"
    if family == "ve":
        return "score"
    if family == "edm":
        raise ValueError(f"{name} drives an EDM-preconditioned network (D = c_skip x + c_out F(c_in x, log(sigma)/4), "
                         f"Karras et al. 2022) whose output F is none of {['eps', 'x0', 'v', 'velocity', 'score']}; "
                         f"wrap it yourself into model_fn(x_t, t) -> (x0, eps) on schedule_from_diffusers(...)")
    return check_prediction(cfg["prediction_type"])


def time_input_from_diffusers(source):
    """The time signal the network saw in training, for wrap_model(time_input=...): the integer timestep for
    beta tables, N t for flow matching ('t1000' when N = 1000), sigma for ScoreSdeVe."""
    name, family, cfg = _resolve(source)
    if family == "table":
        return "timestep"
    if family == "flow":
        n = cfg["num_train_timesteps"]
        return "t1000" if n == 1000 else (lambda t: n * t)
    if family == "ve":
        return "edm_sigma"
    raise ValueError(f"{name}: the network sees c_noise = log(sigma) / 4 and c_in-scaled inputs (EDM "
                     f"preconditioning), which wrap_model does not apply")
