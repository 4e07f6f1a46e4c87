"""Project samplers inside diffusers pipelines: a diffusers scheduler whose step() drives any registered sampler.

    pipe.scheduler = ProjectScheduler.from_scheduler(pipe.scheduler, sampler="dpmpp_2m", time_grid="log_snr")
    image = pipe(prompt, num_inference_steps=20).images[0]

A sampler is a function with its own loop. Here it runs in a worker thread whose model_fn hands (x, t) to the
pipeline and waits for the network output that step() receives, converted to (x0, eps) with the prediction kind of
the wrapped diffusers scheduler (diffusion.interop). Of that scheduler only the schedule, the prediction kind and the
time signal are used, not its sampling options (timestep_spacing, clip_sample, ...). The pipeline's latents are the
project's x_t, so scale_model_input is the identity and init_noise_sigma the schedule's prior std; step() returns
the next x the sampler evaluates, or its final sample. A fixed-grid sampler's evaluation times do not depend on the
model, so set_timesteps finds them by a dry run on a zero model, and `timesteps` holds what the network sees there
(the fractional training timestep of a beta table, 1000 t for flow matching). Samplers with two evaluations per
step (heun, dpm_2, flow_heun) set `order` = 2, as diffusers' Heun schedulers: pipelines use it for the progress bar
and img2img's start index only.
"""
from __future__ import annotations

import inspect
import math
import weakref

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .fitted_grid import is_grid_file, load_time_grid
from .interop import (SUPPORTED_SCHEDULERS, load_scheduler_config, prediction_from_diffusers, schedule_from_diffusers,
                      time_input_from_diffusers)
from .prediction import to_x0_eps
from .sampler_run import SamplerRun, dry_run
from .samplers import SAMPLERS, generators_from_seeds
from .sampling import get_sampler
from .schedule import RectifiedFlow, Schedule, shift_time
from .timesteps import check_timesteps, default_time_grid, get_timesteps, timesteps_from_sigmas
from .wrappers import _output_tensor, time_signal

__all__ = ["ProjectScheduler"]

_SAMPLER_ARGS = ("model_fn", "x", "ts", "schedule", "generator", "callback", "progress")
_OWN_KEYS = ("scheduler_config", "sampler", "time_grid", "grid_options", "sampler_options", "seed", "timesteps",
             "sigmas")
_T_TOL = 1e-6  # float32 vs float64 time tensors of the same grid point differ by < 1e-7


def _fixed_grid_samplers() -> list:
    return sorted(name for name, fn in SAMPLERS.items() if getattr(fn, "nfe_per_step", 1) is not None)


class ProjectScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running a project sampler (diffusion.SAMPLERS) on a project time grid.

    Args:
        scheduler_config: config of the diffusers scheduler it replaces, with "_class_name" (schedule, prediction
            kind and time signal are read from it by diffusion.interop); its keys are mirrored at the top level
            of `config` because pipelines read them there (num_train_timesteps, use_dynamic_shifting, ...).
        sampler: a name in diffusion.SAMPLERS with a fixed grid (adaptive samplers cannot follow the timesteps a
            pipeline fixes before its loop).
        time_grid: a name in diffusion.TIME_GRIDS or the path of a .json grid (diffusion.optimize_timesteps);
            None: the project default for the sampler and steps (diffusion.timesteps.default_time_grid; diffusers'
            DDIM / Euler parity: time_grid="trailing"), or the pipeline's own `timesteps=` / `sigmas=` when it
            passes them.
        grid_options: keyword options of a named time grid (e.g. {"rho": 7} for karras).
        timesteps, sigmas: instead of time_grid, an explicit grid as diffusion.sample takes it: decreasing times t
            ending at 0, or EDM sigmas ending at 0. A .json or explicit grid fixes the number of steps: the
            pipeline's num_inference_steps must match it.
        sampler_options: keyword options of the sampler (e.g. {"eta": 1.0} for ddim, {"order": 3} for unipc).
        seed: per-sample seeds seed, seed + 1, ... for stochastic samplers when the pipeline passes no generator
            to step(); a pipeline's generator takes precedence.
    Build it with `ProjectScheduler.from_scheduler(pipe.scheduler, sampler=...)`.
    """

    _compatibles = sorted(SUPPORTED_SCHEDULERS)  # their keys (the mirrors) are dropped silently on reload
    order = 1

    @register_to_config
    def __init__(self, scheduler_config: dict | None = None, sampler: str = "dpmpp_2m", time_grid: str | None = None,
                 grid_options: dict | None = None, sampler_options: dict | None = None, seed: int | None = None,
                 timesteps=None, sigmas=None):
        if not isinstance(scheduler_config, dict) or "_class_name" not in scheduler_config:
            raise ValueError("ProjectScheduler needs scheduler_config, the config of the diffusers scheduler it "
                             "replaces with its '_class_name': build it with ProjectScheduler.from_scheduler("
                             "pipe.scheduler, sampler=...)")
        cfg = dict(scheduler_config)
        self._prediction = prediction_from_diffusers(cfg)
        self._time_input = time_input_from_diffusers(cfg)
        self._dynamic = bool(cfg.get("use_dynamic_shifting"))
        # alpha / sigma before set_timesteps: a dynamic flow shift moves the grid only, not alpha / sigma
        self._schedule_cfg = cfg
        self._schedule = schedule_from_diffusers({**cfg, "use_dynamic_shifting": False} if self._dynamic else cfg)
        fn = get_sampler(sampler)
        if getattr(fn, "nfe_per_step", 1) is None:
            raise ValueError(f"sampler {sampler!r} picks its steps from the model's outputs, but a diffusers pipeline "
                             f"fixes scheduler.timesteps before its loop; use a fixed-grid sampler: "
                             f"{_fixed_grid_samplers()}")
        valid = [p for p in inspect.signature(fn).parameters if p not in _SAMPLER_ARGS]
        unknown = sorted(set(sampler_options or {}) - set(valid))
        if unknown:
            raise ValueError(f"sampler {sampler!r} has no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(valid) or 'none'}")
        # the grid must build (unknown names / options, bad files or times raise here, not inside a pipeline)
        if (time_grid is not None) + (timesteps is not None) + (sigmas is not None) > 1:
            raise ValueError("pass ProjectScheduler one of time_grid, timesteps or sigmas")
        time_grid = str(time_grid) if is_grid_file(time_grid) else time_grid
        own = dict(time_grid=time_grid, timesteps=timesteps, sigmas=sigmas)
        fixed = self._fixed_grid(self._schedule, own, sampler, check_schedule=not self._dynamic)
        if fixed is None:
            get_timesteps(time_grid or default_time_grid(self._schedule, sampler, 2), 2, self._schedule,
                          **(grid_options or {}))
        elif grid_options:
            raise ValueError("grid_options configure a named time_grid; explicit timesteps / sigmas and .json grid "
                             "files are used as given")
        else:  # explicit grids go to the config as plain float64 lists (save_pretrained writes JSON)
            as_list = {k: [float(v) for v in torch.as_tensor(own[k], dtype=torch.float64).flatten()]
                       for k in ("timesteps", "sigmas") if own[k] is not None}
            self.register_to_config(time_grid=time_grid, **as_list)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self._fn = fn
        self.order = getattr(fn, "nfe_per_step", 1)
        self.register_to_config(**{k: v for k, v in cfg.items() if not k.startswith("_") and k not in _OWN_KEYS})
        self.timesteps, self.num_inference_steps = None, None
        self._plan = self._run = self._request = self._finalizer = None
        self._step_index = self._begin_index = None

    @classmethod
    def from_scheduler(cls, source, sampler: str = "dpmpp_2m", time_grid: str | None = None,
                       grid_options: dict | None = None, sampler_options: dict | None = None,
                       seed: int | None = None, timesteps=None, sigmas=None) -> "ProjectScheduler":
        """Wrap a diffusers scheduler (object, pipeline, config dict, scheduler_config.json or directory)."""
        cfg = load_scheduler_config(source)
        if cfg["_class_name"] == cls.__name__:  # re-wrapping: wrap what it wraps
            cfg = dict(cfg["scheduler_config"])
        cfg = {k: v for k, v in cfg.items() if k == "_class_name" or not k.startswith("_")}
        return cls(scheduler_config=cfg, sampler=sampler, time_grid=time_grid, grid_options=grid_options,
                   sampler_options=sampler_options, seed=seed, timesteps=timesteps, sigmas=sigmas)

    # --- what pipelines read --------------------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """Std of x at the grid's first time for unit-variance data (1 for VP tables and flow matching)."""
        if self._plan is None:
            return self._schedule.prior_std()
        schedule, ts = self._plan[:2]
        return schedule.prior_std(float(ts[0]))

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: the pipeline's latents are x_t itself."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      mu: float | None = None) -> None:
        """Build the time grid and the evaluation times, and drop any sampler still running.

        `timesteps` (network time signals, as diffusers: training timesteps / 1000 t) or `sigmas` (flow matching:
        times before the shift, as FlowMatchEuler; beta tables: EDM sigma) replace the named grid; t = 0 is
        appended. `mu` is the dynamic flow shift log(s) that flow pipelines pass (use_dynamic_shifting)."""
        self._stop()
        if self._dynamic and mu is None:
            raise ValueError(f"{self._schedule_cfg['_class_name']} has use_dynamic_shifting=True: set_timesteps needs "
                             f"mu= (flow pipelines pass it; diffusion.interop.dynamic_shift_mu computes it from the "
                             f"number of image tokens)")
        schedule = self._schedule if mu is None else schedule_from_diffusers(self._schedule_cfg, mu=mu)
        ts = self._grid(schedule, num_inference_steps, timesteps, sigmas)
        times, starts = dry_run(self._fn, ts, schedule, self.config.sampler_options or {})
        signal = time_signal(schedule, torch.tensor(times, dtype=torch.float32), self._time_input)
        self.timesteps = signal.to(device)
        self.num_inference_steps = len(ts) - 1
        self._plan = (schedule, ts, times, starts)
        self._step_index = self._begin_index = None

    @staticmethod
    def _fixed_grid(schedule: Schedule, own: dict, sampler: str, check_schedule: bool = True):
        """The scheduler's own explicit grid (timesteps, EDM sigmas or a .json file) as times t, or None."""
        if own.get("timesteps") is not None:
            ts = check_timesteps(own["timesteps"])
            if ts[0] > schedule.t_max:
                raise ValueError(f"timesteps start at t={float(ts[0]):.6g}, beyond this schedule's t_max="
                                 f"{schedule.t_max:.6g}")
            return ts
        if own.get("sigmas") is not None:
            return timesteps_from_sigmas(own["sigmas"], schedule)
        if is_grid_file(own.get("time_grid")):
            return load_time_grid(own["time_grid"], schedule=schedule if check_schedule else None,
                                  sampler=sampler).timesteps
        return None

    def _grid(self, schedule: Schedule, n, timesteps, sigmas) -> torch.Tensor:
        given = [name for name, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if not given:
            if n is None and self.config.timesteps is None and self.config.sigmas is None \
                    and not is_grid_file(self.config.time_grid):
                raise ValueError("set_timesteps needs num_inference_steps (or timesteps= / sigmas=)")
            fixed = self._fixed_grid(schedule, dict(self.config), self.config.sampler)
            if fixed is None:
                name = self.config.time_grid or default_time_grid(schedule, self.config.sampler, n)
                return check_timesteps(get_timesteps(name, n, schedule, **(self.config.grid_options or {})))
            if n is not None and n != len(fixed) - 1:
                raise ValueError(f"num_inference_steps={n}, but this scheduler's own grid has {len(fixed) - 1} steps: "
                                 f"call the pipeline with num_inference_steps={len(fixed) - 1}")
            return fixed
        if len(given) > 1:
            raise ValueError("pass set_timesteps either timesteps= or sigmas=, not both")
        if any(self.config.get(k) is not None for k in ("time_grid", "timesteps", "sigmas")) \
                or self.config.grid_options:
            raise ValueError(f"set_timesteps({given[0]}=...) and this scheduler's time_grid="
                             f"{self.config.time_grid!r} both choose the time grid: build the scheduler with "
                             f"time_grid=None to follow the pipeline's {given[0]}, or call the pipeline without them")
        values = torch.as_tensor(timesteps if timesteps is not None else sigmas, dtype=torch.float64).flatten().cpu()
        if n is not None and n != len(values):
            raise ValueError(f"num_inference_steps={n} but {len(values)} {given[0]} were given")
        zero = torch.zeros(1, dtype=torch.float64)
        if timesteps is not None:
            return check_timesteps(torch.cat([self._t_from_signal(values, schedule), zero]))
        if isinstance(schedule, RectifiedFlow):
            values = values[:-1] if values[-1] == 0 else values
            return check_timesteps(torch.cat([shift_time(values, schedule.shift), zero]))
        return timesteps_from_sigmas(values if values[-1] == 0 else torch.cat([values, zero]), schedule)

    def _t_from_signal(self, signal, schedule: Schedule) -> torch.Tensor:
        """The time t at which the network sees `signal` (the inverse of wrap_model's time signal)."""
        s = torch.as_tensor(signal).to(torch.float64)
        kind = self._time_input
        if kind == "timestep":
            return schedule.t_from_timestep(s)
        if kind == "edm_sigma":
            return schedule.t_from_edm_sigma(s)
        if kind == "t1000":
            return s / 1000
        return s / float(kind(torch.tensor(1.0, dtype=torch.float64)))  # flow matching: signal = N t

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation `begin_index` of `timesteps` (img2img: t_start * order), where a sampler step starts;
        the sampler then runs on the rest of the grid from the latents it is given there."""
        self._begin_index = begin_index
        if self._plan is not None:
            self._start_point(begin_index)

    def _start_point(self, k: int) -> int:
        """Grid index of the step that starts at evaluation k (checked by a dry run of the rest of the grid)."""
        schedule, ts, times, starts = self._plan
        if k == 0:
            return 0
        if k not in starts:
            raise ValueError(f"begin index {k} is not where a step of sampler {self.config.sampler!r} starts; "
                             f"valid: {[s for s in starts if s is not None]} (img2img pipelines pass t_start * order)")
        i = starts.index(k)
        if i > 0 and dry_run(self._fn, ts[i:], schedule, self.config.sampler_options or {})[0] != times[k:]:
            raise ValueError(f"sampler {self.config.sampler!r} started at grid point {i} evaluates the model at other "
                             f"times than the tail of scheduler.timesteps; start at begin index 0")
        return i

    # --- the step ------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Hand the network output at `sample` (the x the sampler asked for; an edit the pipeline made, e.g. an
        inpainting blend, carries over into the sampler's state) to the sampler; returns the next x it evaluates,
        or its final sample after the last entry of `timesteps`. Errors inside the sampler are raised here."""
        if self._plan is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        k = (self._begin_index or 0) if self._step_index is None else self._step_index
        times = self._plan[2]
        if k >= len(times):
            raise RuntimeError(f"all {len(times)} model evaluations of sampler {self.config.sampler!r} are done; "
                               f"call set_timesteps() to sample again")
        got, expected = float(torch.as_tensor(timestep).flatten()[0]), float(self.timesteps[k])
        if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"step() got timestep {got:.6g}, but evaluation {k} of the sampler is at timestep "
                             f"{expected:.6g}: pass scheduler.timesteps in order (set_begin_index to start later)")
        try:
            prev = self._advance(k, model_output, sample, generator)
        except BaseException:
            self._stop()
            raise
        self._step_index = k + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _advance(self, k: int, model_output, sample, generator) -> torch.Tensor:
        schedule, _, times, _ = self._plan
        if self._run is None:
            self._start(k, sample, generator)
        x, t = self._request
        if abs(float(t[0]) - times[k]) > _T_TOL:
            raise RuntimeError(f"sampler {self.config.sampler!r} evaluated the model at t={float(t[0]):.6g}, but its "
                               f"dry run on a zero model did at t={times[k]:.6g} (evaluation {k}): its times depend on "
                               f"the model, and a pipeline fixes scheduler.timesteps before its loop; use one of "
                               f"{_fixed_grid_samplers()}")
        if sample.shape != x.shape:
            raise ValueError(f"step() got sample of shape {tuple(sample.shape)}; the sampler runs on {tuple(x.shape)}")
        x.copy_(sample)  # the pipeline's latents are the sampler's state
        x0, eps = to_x0_eps(self._prediction, _output_tensor(model_output, x).to(x.dtype), x, t, schedule)
        kind, value, t_next = self._run.answer(x0, eps)
        if kind == "error":
            raise value
        last = k + 1 == len(times)
        if (kind == "done") != last:
            raise RuntimeError(f"sampler {self.config.sampler!r} {'stopped' if kind == 'done' else 'went on'} after "
                               f"{k + 1} model evaluations, where its dry run made {len(times)}: its steps depend on "
                               f"the model; use one of {_fixed_grid_samplers()}")
        if kind == "done":
            self._stop()
            return value
        self._request = (value, t_next)
        return value.clone()  # the sampler updates its own buffer in place

    def _start(self, k: int, sample: torch.Tensor, generator) -> None:
        schedule, ts, _, _ = self._plan
        i = self._start_point(k)
        seed = self.config.seed
        if generator is None and seed is not None:
            generator = generators_from_seeds(seed, sample.shape[0], sample.device)
        run = SamplerRun(self._fn, sample, ts[i:], schedule, generator, self.config.sampler_options or {},
                          torch.is_grad_enabled())
        self._run, self._finalizer = run, weakref.finalize(self, run.cancel)
        self._finalizer.atexit = False
        kind, value, t = run.next()
        if kind == "error":
            raise value
        if kind == "done":
            raise RuntimeError(f"sampler {self.config.sampler!r} finished without evaluating the model")
        self._request = (value, t)

    def _stop(self) -> None:
        """End the worker of a run that did not finish (a new set_timesteps, an error, an abandoned pipeline call)."""
        if self._finalizer is not None:
            self._finalizer()  # run.cancel(), once
        self._run = self._request = self._finalizer = None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise at the time where the network sees `timesteps` (img2img's start)."""
        schedule = self._schedule if self._plan is None else self._plan[0]
        t = self._t_from_signal(timesteps, schedule).to(original_samples.device)
        return schedule.add_noise(original_samples, noise, t)

    def __getstate__(self):
        """Copies and pickles keep the config and the grid, never a running sampler."""
        state = dict(self.__dict__)
        state.update(_run=None, _request=None, _finalizer=None, _step_index=None)
        return state

    def __len__(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))
