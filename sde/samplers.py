"""Score-SDE samplers: predictor-corrector (Song et al. 2021, Alg. 1-5) and the adaptive
probability-flow ODE (Sec. 4.3), behind sde.sample() with diffusion.sample()'s signature.

Grid: `steps` times uniform from t_max down to eps (score-SDE's linspace(T, eps, N)), then t = 0.
At each grid time the corrector runs n_steps Langevin steps and the predictor moves to the next
time; the move from eps to 0 is the noise-free denoising step x = E[x0 | x_eps] (Tweedie), so the
output is at t = 0 and a PC sampler spends steps * (1 + n_steps) model evaluations, as score-SDE.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from diffusion.samplers import as_generators, randn_like
from diffusion.timesteps import check_timesteps

from .ode import ODE_METHODS, solve
from .sdes import SDE, ReverseSDE, as_sde, check_time

Tensor = torch.Tensor


def randn(x: Tensor, generator=None) -> Tensor:
    """Standard normal like x; per-sample generators make each sample depend on its seed only."""
    return randn_like(x, as_generators(generator, x.shape[0]))


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.ndim - 1))


# --- predictors: (rsde, x, t_i, t_j, generator) -> (x, x_mean), t_j < t_i, t_j > 0 ------------------------
def euler_maruyama_step(rsde: ReverseSDE, x, t_i, t_j, generator=None):
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, App. D): x += drift dt + g sqrt(|dt|) z."""
    dt = t_j - t_i
    x_mean = x + rsde.drift(x, t_i) * dt
    g = rsde.diffusion(t_i)
    return (x_mean + (g * math.sqrt(-dt)) * randn(x, generator), x_mean) if g > 0 else (x_mean, x_mean)


def reverse_diffusion_step(rsde: ReverseSDE, x, t_i, t_j, generator=None):
    """Reverse diffusion (Song et al. 2021, eq. 46): with the forward kernel x_i = a x_j + G z,
    x_j = (2 - a) x_i + G^2 score + G z (score-SDE's discretize(), exact kernel on any grid)."""
    a, G2 = rsde.sde.transition(t_i, t_j)
    c = 0.5 if rsde.probability_flow else 1.0
    x_mean = (2 - a) * x + (c * G2) * rsde.score(x, t_i)
    if rsde.probability_flow or G2 == 0:
        return x_mean, x_mean
    return x_mean + math.sqrt(G2) * randn(x, generator), x_mean


def ancestral_step(rsde: ReverseSDE, x, t_i, t_j, generator=None, variance: str = "posterior"):
    """Ancestral sampling (Ho et al. 2020, Alg. 2; Song et al. 2021, App. F): mean (x + G^2 score) / a,
    the posterior mean of q(x_j | x_i, x0 = Tweedie); variance 'posterior' = G^2 sigma_j^2 / sigma_i^2
    (DDPM's beta-tilde = diffusion.samplers.sample_ddpm; score-SDE's VE step) or 'beta' = G^2
    (DDPM's sigma^2 = beta; score-SDE's VP step)."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown ancestral variance {variance!r}; valid: ['posterior', 'beta']")
    a, G2 = rsde.sde.transition(t_i, t_j)
    x_mean = (x + G2 * rsde.score(x, t_i)) / a
    var = G2
    if variance == "posterior":
        s_i, s_j = (float(rsde.sde.marginal(t)[1]) for t in (t_i, t_j))
        var = G2 * s_j ** 2 / s_i ** 2
    return (x_mean + math.sqrt(var) * randn(x, generator), x_mean) if var > 0 else (x_mean, x_mean)


def no_step(rsde, x, t_i, t_j, generator=None):
    """Corrector-only sampling (score-SDE's NonePredictor)."""
    return x, x


# --- correctors: (rsde, x, t_i, t_next, snr, n_steps, generator) -> (x, x_mean) --------------------------
def langevin_step_size(rsde: ReverseSDE, z: Tensor, score: Tensor, t: float, t_next: float, snr: float,
                       annealed: bool, norm: str = "batch"):
    """Langevin step 2 a (snr |z| / |score|)^2 (Song et al. 2021, Alg. 4-5), a = (alpha_t / alpha_next)^2.

    norm='batch': |z|, |score| are batch means of per-sample norms, as score-SDE. norm='sample' (per-sample
    seeds) and the annealed corrector (NCSN; Song & Ermon 2019, Alg. 1) use batch-independent values
    instead: |z| -> its RMS sqrt(D) and |score| -> sqrt(D) / sigma_t (the RMS score of the noise part of
    p_t; E|score|^2 <= D / sigma_t^2 by Jensen), i.e. step = 2 a (snr sigma_t)^2. A sample's own norms
    would make the step a function of its state, ~ 1 / |score(x)|^2: unbounded at every mode (heavy-tailed
    in low D, where |score| ~ 0 has non-negligible mass) and no longer targeting p_t."""
    _check_choice("norm", norm, ("batch", "sample"))
    a = (float(rsde.sde.marginal(t)[0]) / float(rsde.sde.marginal(t_next)[0])) ** 2
    if annealed or norm == "sample":
        return 2 * a * (snr * float(rsde.sde.marginal(t)[1])) ** 2
    nz, ns = _per_sample_norm(z).mean(), _per_sample_norm(score).mean()
    return 2 * a * (snr * nz / ns.clamp_min(1e-30)) ** 2


def _check_step(rsde: ReverseSDE, x: Tensor, t: float, step, snr: float, norm: str, annealed: bool):
    """A corrector step that sent x to NaN/Inf or beyond 1e4 prior stds (a diverging step, before the
    model overflows on it): name the step size and the fix, not the network."""
    limit = 1e4 * max(rsde.sde.prior_std, 1.0)
    size = float(x.abs().max())
    if not size <= limit:
        name = "annealed Langevin" if annealed else "Langevin"
        step = float(step.max()) if torch.is_tensor(step) else float(step)
        rule = "2 a (snr sigma_t)^2" if annealed or norm == "sample" else "2 a (snr |z| / |score|)^2 (batch norms)"
        raise FloatingPointError(
            f"{name} corrector diverged at t = {t:.4g}: step size {step:.3g} = {rule} with snr = {snr:g} "
            f"sent |x| to {size:.3g} (limit {limit:.3g} = 1e4 prior stds); lower snr (score-SDE: 0.16 "
            f"Langevin, 0.316 annealed), use more steps, or pass corrector='none'")


def _langevin(rsde: ReverseSDE, x, t, t_next, snr, n_steps, generator, annealed: bool, norm: str = "batch"):
    """Langevin MCMC at fixed t, x += step score + sqrt(2 step) z (step: langevin_step_size)."""
    x_mean = x
    for _ in range(n_steps):
        score = rsde.score(x, t)
        z = randn(x, generator)
        step = langevin_step_size(rsde, z, score, t, t_next, snr, annealed, norm)
        x_mean = x + step * score
        x = x_mean + (2 * step) ** 0.5 * z
        _check_step(rsde, x, t, step, snr, norm, annealed)
    return x, x_mean


def langevin_corrector(rsde, x, t, t_next, snr=0.16, n_steps=1, generator=None, norm="batch"):
    """Langevin corrector with a target signal-to-noise ratio (Song et al. 2021, Alg. 4)."""
    return _langevin(rsde, x, t, t_next, snr, n_steps, generator, annealed=False, norm=norm)


def annealed_langevin_corrector(rsde, x, t, t_next, snr=0.316, n_steps=1, generator=None, norm="sample"):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Alg. 1), step 2 a (snr sigma_t)^2."""
    return _langevin(rsde, x, t, t_next, snr, n_steps, generator, annealed=True, norm=norm)


PREDICTORS = {"euler_maruyama": euler_maruyama_step, "reverse_diffusion": reverse_diffusion_step,
              "ancestral": ancestral_step, "none": no_step}
CORRECTORS = {"langevin": langevin_corrector, "annealed_langevin": annealed_langevin_corrector, "none": None}

# named samplers: (predictor, corrector, default snr); "ode" is the adaptive probability-flow sampler
SAMPLERS = {
    "euler_maruyama": ("euler_maruyama", "none", None),
    "reverse_diffusion": ("reverse_diffusion", "none", None),
    "ancestral": ("ancestral", "none", None),
    "langevin": ("none", "langevin", 0.16),
    "annealed_langevin": ("none", "annealed_langevin", 0.316),
    "pc": ("reverse_diffusion", "langevin", 0.16),
    "ode": None,
}



def _check_choice(kind: str, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {sorted(valid)}")
    return value


def _check_positive(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def get_time_grid(sde: SDE, steps: int, eps: float | None = None, kind: str = "uniform") -> Tensor:
    """`steps` times from t_max to eps (uniform in t as score-SDE, or in log-SNR), then 0."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    eps = sde.eps if eps is None else check_time("eps", eps)
    if eps >= sde.t_max:
        raise ValueError(f"eps = {eps} must be smaller than t_max = {sde.t_max}")
    _check_choice("time_grid", kind, ("uniform", "log_snr"))
    if steps == 1:
        ts = torch.tensor([sde.t_max], dtype=torch.float64)
    elif kind == "uniform":
        ts = torch.linspace(sde.t_max, eps, steps, dtype=torch.float64)
    else:
        lam = sde.schedule.log_snr(torch.tensor([sde.t_max, eps], dtype=torch.float64)).clamp(-30, 30)
        ts = sde.schedule.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), steps, dtype=torch.float64))
        ts[0], ts[-1] = sde.t_max, eps
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


def _report(callback, i, t, x, x_mean, rsde):
    """callback({"i", "t", "x", "x0", "x_mean", "nfe"}): x at time t, the model's latest x0 estimate,
    the predictor's noise-free next state (None for the ODE / the final step) and the NFE so far."""
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": rsde.last_x0, "x_mean": x_mean, "nfe": rsde.nfe})


def sample_pc(rsde: ReverseSDE, x: Tensor, ts: Tensor, *, predictor="reverse_diffusion", corrector="langevin",
              snr=0.16, n_steps=1, denoise=True, generator=None, callback=None, progress=False,
              variance="posterior", norm="batch"):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1): corrector then predictor at every grid
    time; the last move (to t = 0) is the noise-free denoising step x0 = E[x0 | x_eps]."""
    pred, corr = PREDICTORS[predictor], CORRECTORS[corrector]
    t = ts.tolist()
    n = len(t) - 1
    rng = range(n)
    if progress:
        from tqdm.auto import tqdm
        rng = tqdm(rng, desc="pc", leave=False)
    for i in rng:
        if corr is not None and n_steps > 0:
            x, _ = corr(rsde, x, t[i], t[i + 1], snr, n_steps, generator, norm=norm)
        if t[i + 1] == 0:
            if not denoise:
                return x
            x0, _ = rsde.denoise(x, t[i])
            _report(callback, i, t[i], x, None, rsde)
            return x0
        kw = {"variance": variance} if pred is ancestral_step else {}
        x_new, x_mean = pred(rsde, x, t[i], t[i + 1], generator, **kw)
        _report(callback, i, t[i], x, x_mean, rsde)
        x = x_new
    return x


def sample_ode(rsde: ReverseSDE, x: Tensor, t_max: float, eps: float, *, rtol=1e-5, atol=1e-5, method="dopri5",
               denoise=True, callback=None):
    """Probability-flow ODE sampler (Song et al. 2021, Sec. 4.3) with an adaptive RK solver from
    t_max to eps, then the denoising step E[x0 | x_eps]; rsde.nfe counts evaluations."""
    def rhs(t, y):
        d = rsde.drift(y, t)
        _report(callback, rsde.nfe - 1, t, y, None, rsde)
        return d
    x = solve(rhs, x, t_max, eps, rtol, atol, method)
    if not denoise:
        return x
    return rsde.denoise(x, eps)[0]


def sample(model_fn: Callable, x_T: Tensor, schedule_or_sde, sampler: str = "pc", steps: int = 1000,
           prediction: str | None = None, time_grid: str = "uniform", timesteps=None, cond: dict | None = None,
           generator=None, callback=None, progress: bool = False, return_nfe: bool = False, **opts):
    """Sample from x_T at t_max to t = 0 with a score-SDE sampler, diffusion.sample()'s signature.

    schedule_or_sde: an sde.SDE, a diffusion Schedule (its marginal-matching SDE) or an SDE name.
    sampler: euler_maruyama | reverse_diffusion | ancestral | langevin | annealed_langevin | pc | ode.
    opts: eps (last time before denoising), denoise (default True), snr, n_steps (corrector),
    norm (Langevin step: batch = score-SDE's batch-mean norms | sample = batch-independent 2 a (snr sigma_t)^2,
    the default for per-sample generators / int seeds), predictor / corrector (for pc), variance
    (ancestral: posterior | beta), rtol, atol, method (ode: dopri5 = scipy RK45's algorithm in torch, default;
    torchdiffeq_<name>; scipy's RK45, ...). `timesteps` overrides the grid (decreasing, ending at 0).
    generator: Generator, list of Generators (one per sample) or int seed(s).
    return_nfe: also return the number of model evaluations, (x, nfe)."""
    _check_choice("sampler", sampler, SAMPLERS)
    sde = as_sde(schedule_or_sde)
    if not torch.is_tensor(x_T) or not torch.isfinite(x_T).all():
        raise ValueError("x_T must be a finite tensor (e.g. sde.prior_sample(shape, generator))")
    rsde = sde.reverse(model_fn, prediction, cond, probability_flow=sampler == "ode")
    gens = as_generators(generator, x_T.shape[0])
    denoise = bool(opts.pop("denoise", True))
    eps = opts.pop("eps", None)
    if sampler == "ode":
        rtol = _check_positive("rtol", opts.pop("rtol", 1e-5))
        atol = _check_positive("atol", opts.pop("atol", 1e-5))
        method = _check_choice("ode method", opts.pop("method", "dopri5"), ODE_METHODS)
        _no_extra(opts, sampler)
        eps = sde.eps if eps is None else check_time("eps", eps)
        x = sample_ode(rsde, x_T, sde.t_max, eps, rtol=rtol, atol=atol, method=method, denoise=denoise,
                       callback=callback)
        return (x, rsde.nfe) if return_nfe else x
    pred, corr, snr_default = SAMPLERS[sampler]
    if sampler == "pc":
        pred = _check_choice("predictor", opts.pop("predictor", pred), PREDICTORS)
        corr = _check_choice("corrector", opts.pop("corrector", corr), CORRECTORS)
        snr_default = 0.316 if corr == "annealed_langevin" else 0.16
    snr = _check_positive("snr", opts.pop("snr", snr_default or 0.16))
    n_steps = opts.pop("n_steps", 1)
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < (1 if pred == "none" else 0):
        raise ValueError(f"n_steps (corrector steps per time) must be an integer >= {int(pred == 'none')}, got {n_steps!r}")
    variance = _check_choice("ancestral variance", opts.pop("variance", "posterior"), ("posterior", "beta"))
    per_sample = isinstance(gens, (list, tuple))
    norm = _check_choice("norm", opts.pop("norm", "sample" if per_sample else "batch"), ("batch", "sample"))
    _no_extra(opts, sampler)
    if timesteps is not None:
        ts = check_timesteps(timesteps)
        f, g2 = sde.coefficients(ts[:-1])
        if not (torch.isfinite(f).all() and torch.isfinite(g2).all()):
            raise ValueError(f"SDE coefficients are not finite on the grid (starts at t = {ts[0]:.4g}); "
                             f"start at or below sde.t_max = {sde.t_max}")
    else:
        ts = get_time_grid(sde, steps, eps, time_grid)
    x = sample_pc(rsde, x_T, ts, predictor=pred, corrector=corr, snr=snr, n_steps=n_steps, denoise=denoise,
                  generator=gens, callback=callback, progress=progress, variance=variance, norm=norm)
    return (x, rsde.nfe) if return_nfe else x


def _no_extra(opts: dict, sampler: str):
    if opts:
        raise ValueError(f"unexpected options {sorted(opts)} for sampler {sampler!r}; valid: eps, denoise, "
                         + ("rtol, atol, method" if sampler == "ode" else "snr, n_steps, norm, predictor, corrector, variance"))


def count_nfe(sampler: str, steps: int, n_steps: int = 1, denoise: bool = True) -> int:
    """Model evaluations of a fixed-grid sampler: predictor 1 + corrector n_steps per time."""
    _check_choice("sampler", sampler, SAMPLERS)
    if sampler == "ode":
        raise ValueError("the ode sampler is adaptive: get its NFE from sample(..., return_nfe=True)")
    pred, corr, _ = SAMPLERS[sampler]
    per = (0 if pred == "none" else 1) + (0 if corr == "none" else n_steps)
    nfe = steps * per + (1 if pred == "none" else 0)
    return nfe if denoise else nfe - 1
