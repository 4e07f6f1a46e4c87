"""Time grids fitted to a model: the interior times of a deterministic sampler's grid are chosen to minimise the
endpoint error against a many-step solution from the same x_T, and saved as JSON usable wherever a grid is.

Objective (as GITS, Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", fit a grid
to a few teacher trajectories of the model): RMSE of sample(grid, x_T) to a 200-step DPM-Solver++(2M) log-SNR
solution of the same x_T, over a small fitting batch. Search: compass (pattern) search in log-SNR, one interior
time at a time, with a per-time step that doubles on success and halves on failure, started from the best named
grid; a move is kept only if it lowers the fitting error, so the result is never worse than its start. Like
"Align Your Steps" (Sabour, Fidler & Kreis 2024) the grid is refined time by time for one model and sampler, but
the objective here is the endpoint error, not their KL upper bound.

    fit = optimize_timesteps(model_fn, schedule, "dpmpp_2m", 10, x_T)   # x_T: a few prior samples
    fit.save("grid.json"); sample(model_fn, x, schedule, "dpmpp_2m", time_grid="grid.json")
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .schedule import Schedule
from .timesteps import TIME_GRIDS, _t_end, check_timesteps, get_timesteps

REFERENCE = {"sampler": "dpmpp_2m", "time_grid": "log_snr"}  # the many-step solution the fit is measured against


def is_grid_file(time_grid) -> bool:
    """True for a time_grid that names a JSON grid file (a path ending in .json) rather than a TIME_GRIDS name."""
    return isinstance(time_grid, os.PathLike) or (isinstance(time_grid, str) and time_grid.lower().endswith(".json"))


@dataclass
class FittedGrid:
    """A time grid (decreasing float64 t ending at 0) with what it was fitted for and how well it did."""

    timesteps: torch.Tensor
    sampler: str
    steps: int
    schedule: str  # repr(schedule), e.g. "Discrete(beta_schedule='linear', ...)"
    fitted_on: dict = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> dict:
        return {"timesteps": [float(t) for t in self.timesteps], "sampler": self.sampler, "steps": self.steps,
                "schedule": self.schedule, "fitted_on": self.fitted_on,
                "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save(self, path) -> Path:
        """Write the grid as JSON (atomically); `path` must end in .json so time_grid=path finds it."""
        path = Path(path)
        if not is_grid_file(str(path)):
            raise ValueError(f"a grid file must end in .json (that is how time_grid=... tells it from a grid name); "
                             f"got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path


def load_time_grid(path, steps: int | None = None, schedule: Schedule | None = None,
                   sampler: str | None = None) -> FittedGrid:
    """Read a grid file written by FittedGrid.save (or by hand: {"timesteps": [...]} suffices) and validate it.

    steps: if given, must equal the file's number of steps (an error otherwise); schedule: must be the one the grid
    was fitted for (same repr) and hold every time; sampler: a different one than fitted for gets a warning."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"time grid file {path} does not exist; write one with diffusion.optimize_timesteps(...)"
                         f".save(path) or scripts/fit_grid.py, or pass a grid name from diffusion.TIME_GRIDS")
    try:
        data = json.loads(path.read_text())
        ts = check_timesteps(data["timesteps"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"time grid file {path} is not a valid grid ({type(e).__name__}: {e}); expected JSON with "
                         f"'timesteps': decreasing times t in [0, 1] ending at 0") from None
    n = len(ts) - 1
    if data.get("steps", n) != n:
        raise ValueError(f"time grid file {path} says steps={data['steps']} but holds {n + 1} times ({n} steps)")
    if steps is not None and steps != n:
        raise ValueError(f"time grid file {path} holds a {n}-step grid but steps={steps} was asked for; pass steps={n} "
                         f"or leave it unset (it is read from the file), or fit a {steps}-step grid "
                         f"(scripts/fit_grid.py --steps {steps})")
    fitted_for = data.get("schedule")
    if schedule is not None:
        if fitted_for is not None and fitted_for != repr(schedule):
            raise ValueError(f"time grid file {path} was fitted for schedule {fitted_for}, not {schedule!r}: its times "
                             f"mean other noise levels here; fit a grid for this schedule")
        if ts[0] > schedule.t_max:
            raise ValueError(f"time grid file {path} starts at t={float(ts[0]):.6g}, beyond this schedule's "
                             f"t_max={schedule.t_max:.6g}")
    if sampler is not None and data.get("sampler") not in (None, sampler):
        warnings.warn(f"time grid {path} was fitted for sampler {data['sampler']!r}; using it with {sampler!r}",
                      stacklevel=3)
    return FittedGrid(ts, data.get("sampler"), n, fitted_for, data.get("fitted_on", {}), data.get("created", ""))


def named_grids(schedule: Schedule, steps: int) -> dict:
    """Every TIME_GRIDS grid with default options that applies to `schedule`, name -> timesteps."""
    grids = {}
    for name in TIME_GRIDS:
        try:
            grids[name] = check_timesteps(get_timesteps(name, steps, schedule))
        except ValueError:  # e.g. leading needs a Discrete table
            continue
    return grids


def rmse(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square of x - reference over every element, in float64."""
    return math.sqrt(float(((x.double() - reference.double()) ** 2).mean()))


def reference_solution(model_fn, schedule: Schedule, x_T: torch.Tensor, steps: int = 200, cond=None,
                       prediction=None) -> torch.Tensor:
    """The many-step solution grids are fitted to: DPM-Solver++(2M) on a log-SNR grid (REFERENCE)."""
    from .sampling import sample

    return sample(model_fn, x_T, schedule, steps=steps, cond=cond, prediction=prediction, **REFERENCE)


def _check_fit_args(sampler: str, steps: int, x_T, reference, max_evals: int) -> None:
    from .sampling import get_sampler

    get_sampler(sampler)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 to fit a grid (a 1-step grid is just [t_max, 0]); "
                         f"got {steps!r}")
    if not torch.is_tensor(x_T) or x_T.ndim < 2:
        raise ValueError("x_T must be a batch tensor (B, ...) of prior samples, e.g. diffusion.prior_sample(shape, "
                         "schedule, seed)")
    if reference is not None and (not torch.is_tensor(reference) or reference.shape != x_T.shape):
        raise ValueError(f"reference must be a tensor shaped like x_T {tuple(x_T.shape)} (the many-step solution of "
                         f"the same x_T); got {getattr(reference, 'shape', type(reference).__name__)}")
    if not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be an integer >= 1, got {max_evals!r}")


def optimize_timesteps(model_fn, schedule: Schedule, sampler: str, steps: int, x_T: torch.Tensor, *, cond=None,
                       prediction: str | None = None, reference: torch.Tensor | None = None,
                       reference_steps: int = 200, init="best", max_evals: int = 200, min_step: float = 0.01,
                       progress: bool = False, **sampler_options) -> FittedGrid:
    """Fit the `steps`-step time grid of a deterministic `sampler` to model_fn from the prior samples x_T.

    Args:
        model_fn, schedule, cond, prediction: as for diffusion.sample (cond holds one entry per sample of x_T).
        x_T: the fitting batch (a few to a few dozen prior samples); measure on other, held-out x_T.
        reference: the many-step solution of x_T if already computed, else reference_solution(.., reference_steps).
        init: "best" (the named grid with the lowest fitting error), a TIME_GRIDS name, or explicit timesteps.
        max_evals: sampler runs allowed for the search; min_step: the search stops when every time's log-SNR
            step is below this.
        sampler_options: passed to the sampler (e.g. order=3 for unipc).
    Returns a FittedGrid; .save(path) writes it, and time_grid=path uses it."""
    from .sampling import sample

    _check_fit_args(sampler, steps, x_T, reference, max_evals)
    t0 = time.time()
    reference_given = reference is not None
    if not reference_given:
        reference = reference_solution(model_fn, schedule, x_T, reference_steps, cond, prediction)

    def run(ts, seed=0):
        return sample(model_fn, x_T, schedule, sampler, timesteps=ts, cond=cond, prediction=prediction,
                      generator=seed, **sampler_options)

    if isinstance(init, str) and init == "best":
        candidates = named_grids(schedule, steps)
    elif isinstance(init, str):
        candidates = {init: check_timesteps(get_timesteps(init, steps, schedule))}
    else:
        candidates = {"explicit": check_timesteps(init)}
        if len(candidates["explicit"]) != steps + 1:
            raise ValueError(f"init has {len(candidates['explicit']) - 1} steps, not steps={steps}")
    outputs = {name: run(ts) for name, ts in candidates.items()}
    named = {name: rmse(x, reference) for name, x in outputs.items()}
    init_name = min(named, key=named.get)
    ts = candidates[init_name]
    again = run(ts, seed=12345)  # a sampler that draws noise gives another endpoint for other seeds
    if rmse(again, outputs[init_name]) > 1e-6 * max(rmse(outputs[init_name], torch.zeros(())), 1e-12):
        raise ValueError(f"sampler {sampler!r} with options {sampler_options} injects noise: its endpoint depends on "
                         f"the seed, so a grid cannot be fitted to a deterministic reference; use an ODE sampler "
                         f"(e.g. dpmpp_2m, unipc, ddim with eta=0)")
    best, evals = named[init_name], len(candidates) + 1

    t_end = float(_t_end(schedule))
    lam = schedule.log_snr(ts[1:-1]).clone()  # interior log-SNRs, increasing
    lam_hi = max(float(schedule.log_snr(torch.tensor(t_end, dtype=torch.float64))), float(lam.max()))
    lam_start = float(schedule.log_snr(ts[:1]))  # -inf where x_T is pure noise
    span = lam_hi - (lam_start if math.isfinite(lam_start) else float(lam[0]))

    def grid_of(lam_new):
        """The grid with these interior log-SNRs, or None where it leaves the allowed range or order."""
        if float(lam_new.max()) > lam_hi + 1e-12 or float(lam_new.min()) < lam_start + min_step:
            return None  # past the last trained time, or noisier than x_T
        inner = schedule.t_from_log_snr(lam_new).to(torch.float64)
        full = torch.cat([ts[:1], inner, torch.zeros(1, dtype=torch.float64)])
        lam_used = schedule.log_snr(full[:-1])  # as the sampler will see them: at least min_step apart
        if torch.any(full[1:] >= full[:-1]) or float(inner[-1]) < t_end * (1 - 1e-9) or \
                torch.any(lam_used[1:] - lam_used[:-1] < min_step):
            return None
        return full

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_evals, initial=evals, desc=f"fit {sampler} {steps} steps")

    def improves(cand) -> bool:
        """Run the grid with interior log-SNRs `cand`; keep it if it lowers the fitting error."""
        nonlocal best, lam, ts, evals
        grid = grid_of(cand)
        if grid is None or evals >= max_evals:
            return False
        err, evals = rmse(run(grid), reference), evals + 1
        if bar is not None:
            bar.update(1)
        if err < best:
            best, lam, ts = err, cand, grid
            return True
        return False

    def compass() -> None:
        """Each time in turn moves by +-delta_i in log-SNR; delta_i doubles on success, halves on failure."""
        delta, direction = torch.full_like(lam, 0.5 * span / steps), torch.ones_like(lam)
        while evals < max_evals and bool((delta >= min_step).any()):
            for i in range(len(lam)):
                if delta[i] < min_step:
                    continue
                for sign in (float(direction[i]), -float(direction[i])):
                    cand = lam.clone()
                    cand[i] += sign * delta[i]
                    if improves(cand):
                        direction[i], delta[i] = sign, min(2 * float(delta[i]), span)
                        break
                else:
                    delta[i] /= 2

    def relocate() -> bool:
        """Escape a local minimum of the compass search: move one time into the middle of the widest log-SNR gap."""
        for i in range(len(lam)):
            rest = torch.cat([lam[:i], lam[i + 1:]])
            ends = [lam_start] if math.isfinite(lam_start) else []
            edges = torch.cat([torch.tensor(ends, dtype=torch.float64), rest, torch.tensor([lam_hi])])
            k = int(torch.argmax(edges[1:] - edges[:-1]))
            if improves(torch.sort(torch.cat([rest, (edges[k:k + 1] + edges[k + 1:k + 2]) / 2])).values):
                return True
        return False

    compass()
    while evals < max_evals and relocate():
        compass()
    if bar is not None:
        bar.close()
    fitted_on = {"samples": int(x_T.shape[0]), "sample_shape": list(x_T.shape[1:]),
                 "reference": "given" if reference_given else
                 f"{REFERENCE['sampler']}, {REFERENCE['time_grid']} grid, {reference_steps} steps",
                 "init": init_name, "rmse_init": named[init_name], "rmse": best, "rmse_named": named,
                 "evals": evals, "seconds": round(time.time() - t0, 1),
                 "sampler_options": {k: repr(v) for k, v in sampler_options.items()},
                 "method": "compass search on the log-SNRs of the interior times with relocation moves, endpoint "
                           "RMSE to the reference"}
    return FittedGrid(ts, sampler, steps, repr(schedule), fitted_on, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
