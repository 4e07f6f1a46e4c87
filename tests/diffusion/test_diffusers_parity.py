"""Parity with diffusers: the project's samplers reproduce diffusers' schedulers on the same inputs.

Both sides see the same deterministic "network" (a fixed nonlinear function of x and the integer
training timestep), the same x_T and the same noise; diffusers runs its usual loop
(scale_model_input -> net -> step), the project runs diffusion.sample(time_grid="trailing").
Everything is float64 on our side; diffusers keeps alphas_cumprod / sigmas in float32 (and upcasts
Euler / DPM-Solver / FlowMatch steps to float32), hence rtol 1e-5 with atol 1e-6 for entries near 0.
With diffusers' tables upcast to float64, DDIM and DDPM agree to ~1e-14 (test_exact_with_float64_tables).

Known differences, by design (each documented in the test that covers it):
- Euler / Heun with 'trailing' or 'linspace' spacing start from init_noise_sigma = sigma_max, i.e. std
  sigma_max / sqrt(1 + sigma_max^2) in VP units, where prior_sample uses 1 (tests start both alike).
- DDIM with set_alpha_to_one=False (the SD1.5 config) ends at alpha_bar[0], timestep 0, not at clean data.
- FlowMatchEulerDiscreteScheduler's default grid shifts linspace(1, shift(1/N), n) (1/N shifted twice)
  and spends its last step from ~0.009 to 0; timesteps_shifted shifts linspace(1, 0, n + 1).
- DDIMScheduler with trailing spacing and n not dividing 1000 steps to t - 1000 // n, not to the next
  grid timestep (n = 7: it moves to 857 but evaluates the model at 856, and ends at timestep 0 instead
  of clean data); our grid is self-consistent, so parity is tested for n dividing 1000.
- UniPCMultistepScheduler(solver_type='bh1') returns NaN on its final step to sigma = 0.
"""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

# diffusers imports its schedulers lazily (Euler pulls in scipy, ~2 s): resolve them at collection time
for _name in ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
              "FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler"):
    getattr(diffusers, _name)

from diffusion import Discrete, RectifiedFlow, get_timesteps, sample, wrap_model  # noqa: E402
from diffusion.timesteps import timesteps_leading, timesteps_shifted  # noqa: E402

N_TRAIN = 1000
TABLE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=N_TRAIN)
NO_CLIP = dict(clip_sample=False, thresholding=False)
RTOL, ATOL = 1e-5, 1e-6
SHAPE = (2, 3, 4, 4)


@pytest.fixture(scope="module")
def schedule():
    return Discrete("scaled_linear")


def net(x, timestep):
    """A fixed smooth nonlinear 'network' of (x, timestep), as eps / v / velocity prediction."""
    s = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
    s = (s / N_TRAIN).reshape(-1, *([1] * (x.ndim - 1))).to(x)
    w = torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))
    return 0.8 * torch.tanh(0.9 * x + w * s) + 0.25 * torch.sin(3.0 * s + x) * (1.0 + w)


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(schedule, sampler, steps, prediction="eps", generator=None, x_start=None, **opts):
    """diffusion.sample with the network fed the training timestep t * N - 1."""
    model = lambda x, t: net(x, schedule.timestep_from_t(t))  # noqa: E731
    return sample(model, x_T() if x_start is None else x_start, schedule, sampler=sampler, steps=steps,
                  prediction=prediction, time_grid=opts.pop("time_grid", "trailing"), generator=generator, **opts)


def theirs(scheduler, steps, generator=None, step_kwargs=None):
    """diffusers' usual denoising loop."""
    scheduler.set_timesteps(steps)
    x = x_T() * scheduler.init_noise_sigma
    for ts in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, ts), ts)
        kw = dict(step_kwargs or {})
        if generator is not None:
            kw["generator"] = generator
        x = scheduler.step(out, ts, x, **kw).prev_sample
    return x.double()


def assert_parity(a, b, rtol=RTOL, atol=ATOL):
    assert torch.isfinite(a).all() and a.abs().max() > 0.1
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --- grids --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4, 7, 10, 25, 50, 333])
def test_trailing_grid_is_diffusers_timesteps(schedule, steps):
    sch = diffusers.DDPMScheduler(**TABLE, timestep_spacing="trailing")
    sch.set_timesteps(steps)
    ts = get_timesteps("trailing", steps, schedule)
    assert ts[-1] == 0
    torch.testing.assert_close(schedule.timestep_from_t(ts[:-1]), sch.timesteps.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", [4, 10, 50])
def test_leading_grid_is_diffusers_timesteps(schedule, steps):
    sch = diffusers.DDIMScheduler(**TABLE, timestep_spacing="leading", steps_offset=1)
    sch.set_timesteps(steps)
    ts = timesteps_leading(steps, schedule, steps_offset=1)
    torch.testing.assert_close(schedule.timestep_from_t(ts[:-1]), sch.timesteps.double(), rtol=0, atol=1e-9)


def test_alphas_cumprod_match(schedule):
    sch = diffusers.DDIMScheduler(**TABLE)
    torch.testing.assert_close(schedule.alphas_cumprod, sch.alphas_cumprod.double(), rtol=0, atol=0)


# --- DDIM / DDPM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_deterministic(schedule, steps, prediction):
    sch = diffusers.DDIMScheduler(**TABLE, **NO_CLIP, set_alpha_to_one=True, timestep_spacing="trailing",
                                  prediction_type=prediction)
    assert_parity(ours(schedule, "ddim", steps, prediction=prediction), theirs(sch, steps))


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_same_noise(schedule, eta):
    """Same torch.Generator seed on both sides: diffusers draws its variance noise with randn_tensor
    in the same order and shape as diffusion.samplers.randn_like."""
    sch = diffusers.DDIMScheduler(**TABLE, **NO_CLIP, set_alpha_to_one=True, timestep_spacing="trailing")
    a = ours(schedule, "ddim", 20, eta=eta, generator=torch.Generator().manual_seed(7))
    b = theirs(sch, 20, generator=torch.Generator().manual_seed(7), step_kwargs={"eta": eta})
    assert_parity(a, b)
    assert not torch.allclose(a, ours(schedule, "ddim", 20, eta=eta, generator=torch.Generator().manual_seed(8)))


def test_ddim_leading_spacing(schedule):
    """SD1.5 default: leading spacing with steps_offset=1. With set_alpha_to_one=True it is our
    'leading' grid exactly; with set_alpha_to_one=False (the SD1.5 config) diffusers' last step stops
    at alpha_bar[0] (timestep 0, t = 1/N) instead of clean data: its output is alpha(1/N) x0 +
    sigma(1/N) eps of the last prediction, where ours returns x0. Both are checked."""
    steps = 10
    ts = timesteps_leading(steps, schedule, steps_offset=1)
    model = lambda x, t: net(x, schedule.timestep_from_t(t))  # noqa: E731
    preds = []
    a = sample(model, x_T(), schedule, sampler="ddim", timesteps=ts, prediction="eps",
               callback=lambda d: preds.append(d))
    kw = dict(**TABLE, **NO_CLIP, timestep_spacing="leading", steps_offset=1)
    assert_parity(a, theirs(diffusers.DDIMScheduler(**kw, set_alpha_to_one=True), steps))
    # set_alpha_to_one=False: reproduce the final partial step from our last (x0, eps)
    last = preds[-1]
    t_last = torch.full((SHAPE[0],), last["t"], dtype=torch.float64)
    eps = net(last["x"], schedule.timestep_from_t(t_last))
    t0 = torch.tensor(1.0 / N_TRAIN, dtype=torch.float64)
    expected = schedule.alpha(t0) * last["x0"] + schedule.sigma(t0) * eps
    assert_parity(expected, theirs(diffusers.DDIMScheduler(**kw, set_alpha_to_one=False), steps))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_exact_with_float64_tables(schedule, prediction):
    """The only DDIM/DDPM difference is diffusers' float32 alphas_cumprod: upcast it and the
    results agree to rounding (DDPM up to diffusers' 1e-10 * z on its last step)."""
    kw = dict(**TABLE, **NO_CLIP, timestep_spacing="trailing", prediction_type=prediction)
    ddim = diffusers.DDIMScheduler(**kw, set_alpha_to_one=True)
    ddim.alphas_cumprod, ddim.final_alpha_cumprod = ddim.alphas_cumprod.double(), ddim.final_alpha_cumprod.double()
    kind = "eps" if prediction == "epsilon" else "v"
    torch.testing.assert_close(ours(schedule, "ddim", 50, prediction=kind), theirs(ddim, 50), rtol=0, atol=1e-12)
    ddpm = diffusers.DDPMScheduler(**kw)
    ddpm.alphas_cumprod, ddpm.one = ddpm.alphas_cumprod.double(), ddpm.one.double()
    a = ours(schedule, "ddpm", 50, prediction=kind, generator=torch.Generator().manual_seed(0))
    b = theirs(ddpm, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_fixed_small(schedule, steps):
    sch = diffusers.DDPMScheduler(**TABLE, **NO_CLIP, variance_type="fixed_small", timestep_spacing="trailing")
    a = ours(schedule, "ddpm", steps, generator=torch.Generator().manual_seed(3))
    b = theirs(sch, steps, generator=torch.Generator().manual_seed(3))
    # diffusers adds sqrt(1e-20) * z on its last step (variance clamped at 1e-20): atol covers it
    assert_parity(a, b)


def test_ddpm_v_prediction(schedule):
    sch = diffusers.DDPMScheduler(**TABLE, **NO_CLIP, variance_type="fixed_small", timestep_spacing="trailing",
                                  prediction_type="v_prediction")
    a = ours(schedule, "ddpm", 10, prediction="v", generator=torch.Generator().manual_seed(5))
    assert_parity(a, theirs(sch, 10, generator=torch.Generator().manual_seed(5)))


# --- Euler ------------------------------------------------------------------------------------------
def euler_start(sch, schedule):
    """Our x_T for diffusers' Euler start x = z * init_noise_sigma in the scaled variable x_t / alpha.
    With 'trailing' / 'linspace' spacing init_noise_sigma is sigma_max, not sqrt(sigma_max^2 + 1):
    diffusers' Euler starts from std sigma_max / sqrt(1 + sigma_max^2) (0.9977 here) in VP units
    where our prior_sample uses 1; the parity tests start both sides from the same point."""
    a_T = schedule.alpha(torch.tensor(schedule.t_max, dtype=torch.float64))
    return x_T() * float(sch.init_noise_sigma) * a_T


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 30])
def test_euler(schedule, steps, prediction):
    sch = diffusers.EulerDiscreteScheduler(**TABLE, timestep_spacing="trailing", prediction_type=prediction)
    b = theirs(sch, steps)
    assert_parity(ours(schedule, "euler", steps, prediction=prediction, x_start=euler_start(sch, schedule)), b)


def test_euler_leading_spacing(schedule):
    """Euler's leading grid ends at sigma = 0 like ours, so it matches with steps_offset=1."""
    sch = diffusers.EulerDiscreteScheduler(**TABLE, timestep_spacing="leading", steps_offset=1)
    model = lambda x, t: net(x, schedule.timestep_from_t(t))  # noqa: E731
    b = theirs(sch, 12)
    ts = timesteps_leading(12, schedule)
    x_start = x_T() * float(sch.init_noise_sigma) * schedule.alpha(ts[0])
    assert_parity(sample(model, x_start, schedule, sampler="euler", timesteps=ts, prediction="eps"), b)


@pytest.mark.parametrize("steps", [3, 8])
def test_heun(schedule, steps):
    """EDM Heun (2 evaluations per step, Euler on the last) is HeunDiscreteScheduler on the same grid."""
    sch = diffusers.HeunDiscreteScheduler(**TABLE, timestep_spacing="trailing")
    b = theirs(sch, steps)
    assert_parity(ours(schedule, "heun", steps, x_start=euler_start(sch, schedule)), b)


# --- DPM-Solver++ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order,steps", [(2, 5), (2, 10), (2, 20), (3, 6), (3, 10), (3, 20)])
def test_dpmpp_multistep(schedule, order, steps, prediction):
    sch = diffusers.DPMSolverMultistepScheduler(**TABLE, algorithm_type="dpmsolver++", solver_order=order,
                                                final_sigmas_type="zero", timestep_spacing="trailing",
                                                prediction_type=prediction)
    name = "dpmpp_2m" if order == 2 else "dpmpp_3m"
    assert_parity(ours(schedule, name, steps, prediction=prediction), theirs(sch, steps))


def test_dpmpp_2m_through_wrap_model(schedule):
    """The same through wrap_model (integer timestep via Discrete.timestep_from_t)."""
    sch = diffusers.DPMSolverMultistepScheduler(**TABLE, final_sigmas_type="zero", timestep_spacing="trailing")
    model_fn = wrap_model(net, schedule, prediction="eps")
    assert_parity(sample(model_fn, x_T(), schedule, "dpmpp_2m", steps=15, time_grid="trailing"), theirs(sch, 15))


# --- UniPC ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize("order,steps,prediction", [(1, 5, "epsilon"), (2, 5, "epsilon"), (2, 12, "v_prediction"),
                                                    (3, 4, "epsilon"), (3, 12, "epsilon")])
def test_unipc(schedule, order, steps, prediction, variant):
    """UniP-p predictor + UniC corrector (lower order at the end, warm-up at the start) is
    UniPCMultistepScheduler with predict_x0, final_sigmas_type='zero': every state handed to the model
    and the result agree. (diffusers' bh1 returns NaN on its last step: its B(h) = -h is -inf there and
    multiplies a zero correction; we use B = -1 when h is infinite, so only the states are compared.)"""
    sch = diffusers.UniPCMultistepScheduler(**TABLE, solver_order=order, solver_type=variant,
                                            timestep_spacing="trailing", prediction_type=prediction)
    sch.set_timesteps(steps)
    x, states_b = x_T(), []
    for ts in sch.timesteps:
        states_b.append(x)
        x = sch.step(net(x, ts), ts, x).prev_sample
    states_a = []
    kind = "eps" if prediction == "epsilon" else "v"
    a = ours(schedule, "unipc", steps, prediction=kind, order=order, variant=variant,
             callback=lambda d: states_a.append(d["x"]))
    for sa, sb in zip(states_a, states_b):
        torch.testing.assert_close(sa, sb.double(), rtol=RTOL, atol=ATOL)
    if variant == "bh2":
        assert_parity(a, x.double())
    assert torch.isfinite(a).all()


def test_unipc_without_corrector_is_unip(schedule):
    """corrector=False is the bare predictor: diffusers with the corrector disabled at every step."""
    sch = diffusers.UniPCMultistepScheduler(**TABLE, timestep_spacing="trailing", disable_corrector=list(range(10)))
    assert_parity(ours(schedule, "unipc", 10, corrector=False), theirs(sch, 10))


# --- flow matching ----------------------------------------------------------------------------------
def flow_net(x, timestep):
    """A velocity 'network' of (x, 1000 sigma)."""
    return net(x, timestep) - 0.5 * x


@pytest.mark.parametrize("steps", [4, 10, 28])
def test_flow_euler_matches_flow_match_euler(steps):
    """FlowMatchEulerDiscreteScheduler(shift=3): its sigmas passed as our explicit grid (t = sigma)."""
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=3.0)
    sch.set_timesteps(steps)
    x = x_T()
    for ts in sch.timesteps:
        x = sch.step(flow_net(x, ts), ts, x).prev_sample
    rf = RectifiedFlow(shift=3.0)
    model = lambda x, t: flow_net(x, 1000 * t)  # noqa: E731
    a = sample(model, x_T(), rf, sampler="flow_euler", timesteps=sch.sigmas.double(), prediction="velocity")
    assert_parity(a, x.double())


@pytest.mark.parametrize("steps", [1, 5, 10, 28, 50])
def test_shifted_grid_vs_diffusers_sigmas(steps):
    """timesteps_shifted shifts linspace(1, 0, n + 1); diffusers shifts linspace(1, shift(1/N), n)
    and appends 0 (its sigma_min is already shifted, so 1/N is shifted twice). Passing diffusers the
    unshifted linspace(1, 1/n, n) as custom sigmas gives exactly our grid. The default grids differ
    by design: diffusers' last step runs from shift(shift(1/N)) ~ 0.009 to 0 (a nearly wasted model
    call), ours spreads the n steps evenly (before the shift) over [0, 1]."""
    ours_ts = timesteps_shifted(steps, RectifiedFlow(shift=3.0))
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=3.0)
    sch.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist())
    torch.testing.assert_close(ours_ts, sch.sigmas.double(), rtol=1e-6, atol=1e-7)
    sch.set_timesteps(steps)
    assert sch.sigmas[0] == ours_ts[0] == 1.0 and sch.sigmas[-1] == ours_ts[-1] == 0.0
    shifted = lambda u: 3 * u / (1 + 2 * u)  # noqa: E731
    expected = shifted(torch.linspace(1.0, shifted(torch.tensor(1.0 / N_TRAIN)).item(), steps, dtype=torch.float64))
    torch.testing.assert_close(sch.sigmas[:-1].double(), expected, rtol=1e-6, atol=1e-7)



# --- the samplers update their own copy of x in place: invisible to the caller ---------------------------
SAMPLER_NAMES = ["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "flow_euler", "flow_heun"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_in_place_updates_are_private(schedule, sampler):
    """x_T is left untouched and callbacks get snapshots of x, not the buffer updated afterwards."""
    start, seen = x_T(), []
    sample(wrap_model(net, schedule, prediction="eps"), start, schedule, sampler=sampler, steps=6,
           generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(d["x"]))
    torch.testing.assert_close(start, x_T(), rtol=0, atol=0)
    torch.testing.assert_close(seen[0], x_T(), rtol=0, atol=0)
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_model_output_aliasing_the_state(schedule, sampler):
    """A model that returns its input tensor (x0 is x) gets the same result as one returning a copy."""
    def aliasing(x, t):
        return x, torch.tanh(x)

    def copying(x, t):
        return x.clone(), torch.tanh(x)
    kw = dict(sampler=sampler, steps=5)
    a = sample(aliasing, x_T(), schedule, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(copying, x_T(), schedule, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "flow_euler"])
def test_gradients_flow_through_sampling(schedule, sampler):
    """With autograd recording, updates go out of place, so d sample / d x_T matches finite differences."""
    start = x_T()[:1].requires_grad_(True)
    model = wrap_model(net, schedule, prediction="eps")
    out = sample(model, start, schedule, sampler=sampler, steps=4)
    (grad,) = torch.autograd.grad(out.sum(), start)
    d = torch.zeros_like(start)
    d.view(-1)[5] = 1e-6
    with torch.no_grad():
        fd = (sample(model, start + d, schedule, sampler=sampler, steps=4).sum()
              - sample(model, start - d, schedule, sampler=sampler, steps=4).sum()) / 2e-6
    assert abs(float(grad.view(-1)[5]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_nan_is_caught(schedule):
    """NaN/Inf checks: after the first step (with its time) and on the result (NaN appearing later)."""
    with pytest.raises(FloatingPointError, match="after the step from t=1"):
        sample(lambda x, t: (x * float("nan"), x), x_T(), schedule, sampler="ddim", steps=4)

    def late_nan(x, t):
        return (x * float("nan") if float(t[0]) < 0.5 else x), x
    with pytest.raises(FloatingPointError, match="end of sampling"):
        sample(late_nan, x_T(), schedule, sampler="dpmpp_2m", steps=4)
