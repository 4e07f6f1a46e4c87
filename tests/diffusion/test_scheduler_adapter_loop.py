"""ProjectScheduler (diffusion/scheduler_adapter.py) driven as a diffusers pipeline's loop drives it, on a toy
network: per-sample seeds, img2img starts and begin index, latents edited between steps, sampler errors, worker
lifetime, model-dependent times, bad input, custom timesteps / sigmas. The pipelines themselves:
test_scheduler_adapter.py."""
import copy
import gc
import threading

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffusion import ProjectScheduler, get_timesteps, sample, schedule_from_diffusers, wrap_model  # noqa: E402
from diffusion.samplers import SAMPLERS  # noqa: E402

STEPS = 5


# --- the loop a pipeline runs, on a toy network ------------------------------------------------------------------
def _toy_base():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction")


def toy_net(x, s):
    """v = 0.5 x + 1e-4 s, with the time signal s a scalar (pipelines) or one per sample (wrap_model)."""
    return 0.5 * x + 1e-4 * torch.as_tensor(s, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def _toy_reference(sampler, x_T, **kw):
    base = _toy_base()
    schedule = schedule_from_diffusers(base)
    return sample(wrap_model(toy_net, schedule, "v", "timestep"), x_T, schedule, sampler=sampler, **kw)


def _drive(sch, x, begin=0, generator=None, edit=None):
    """The denoising loop of a diffusers pipeline (set_timesteps already called); edit(i, x) may replace x."""
    for i, t in enumerate(sch.timesteps[begin:]):
        x = sch.step(toy_net(x, t), t, x, generator=generator, return_dict=False)[0]
        if edit is not None:
            x = edit(i, x)
    return x


def _workers():
    return [th for th in threading.enumerate() if th.name == "ProjectScheduler-sampler" and th.is_alive()]


X_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def test_seed_option_gives_per_sample_seeds_when_the_pipeline_passes_no_generator():
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="ddpm", seed=3)
    sch.set_timesteps(STEPS)
    ours = _drive(sch, X_T)
    torch.testing.assert_close(ours, _toy_reference("ddpm", X_T, steps=STEPS, generator=3), atol=1e-6, rtol=0)
    other = ProjectScheduler.from_scheduler(_toy_base(), sampler="ddpm", seed=4)
    other.set_timesteps(STEPS)
    assert (_drive(other, X_T) - ours).abs().max() > 1e-2  # the noise does come from the seed


def test_img2img_start_add_noise_and_begin_index():
    """img2img: timesteps[t_start * order:], set_begin_index, add_noise at the first of them == sample() on the tail
    of the grid from alpha x0 + sigma noise; Heun's corrector evaluations are not valid starts."""
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="heun", time_grid="trailing")
    sch.set_timesteps(STEPS)
    t_start = 2
    begin = t_start * sch.order
    with pytest.raises(ValueError, match="not where a step"):
        sch.set_begin_index(begin - 1)
    sch.set_begin_index(begin)
    x0, noise = torch.randn_like(X_T), torch.randn_like(X_T)
    x = sch.add_noise(x0, noise, sch.timesteps[begin:begin + 1].repeat(2))
    ours = _drive(sch, x, begin=begin)
    schedule = schedule_from_diffusers(_toy_base())
    ts = get_timesteps("trailing", STEPS, schedule)
    ref = _toy_reference("heun", schedule.add_noise(x0, noise, ts[t_start]), timesteps=ts[t_start:])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_latents_edited_between_steps_carry_over():
    """A pipeline that rewrites latents after a step (inpainting blend, callback_on_step_end) continues from them."""
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="ddim", time_grid="trailing")
    sch.set_timesteps(STEPS)
    y = torch.randn_like(X_T)
    ours = _drive(sch, X_T, edit=lambda i, x: y if i == 1 else x)
    ts = get_timesteps("trailing", STEPS, schedule_from_diffusers(_toy_base()))
    torch.testing.assert_close(ours, _toy_reference("ddim", y, timesteps=ts[2:]), atol=1e-6, rtol=0)


def test_sampler_errors_surface_in_step_and_end_the_worker():
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="dpmpp_2m")
    sch.set_timesteps(STEPS)
    t = sch.timesteps[0]
    with pytest.raises(FloatingPointError, match="not finite"):
        sch.step(torch.full_like(X_T, float("nan")), t, X_T)
    assert not _workers()


def test_no_stale_worker_survives():
    before = len(_workers())
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="unipc")
    sch.set_timesteps(STEPS)
    x = X_T
    for t in sch.timesteps[:2]:  # an abandoned pipeline call leaves the sampler waiting for a model output
        x = sch.step(toy_net(x, t), t, x).prev_sample
    assert len(_workers()) == before + 1
    sch.set_timesteps(STEPS)  # a new call ends it
    assert len(_workers()) == before
    full = _drive(sch, X_T)  # a finished run leaves none
    assert len(_workers()) == before
    torch.testing.assert_close(full, _toy_reference("unipc", X_T, steps=STEPS), atol=1e-6, rtol=0)
    sch.set_timesteps(STEPS)
    t = sch.timesteps[0]
    sch.step(toy_net(X_T, t), t, X_T)
    clone = copy.deepcopy(sch)  # copies carry the grid, not the worker
    assert clone._run is None and len(_workers()) == before + 1
    del sch
    gc.collect()  # a dropped scheduler ends its worker
    assert len(_workers()) == before
    assert len(clone.timesteps) == STEPS


def test_model_dependent_evaluation_times_raise(monkeypatch):
    def toy_adaptive(model_fn, x, ts, schedule, *, generator=None, callback=None, progress=False):
        _, eps = model_fn(x, torch.full((x.shape[0],), float(ts[0])))
        t1 = 0.5 if float(eps.abs().max()) == 0 else 0.25  # the zero model of the dry run goes to 0.5
        return model_fn(x, torch.full((x.shape[0],), t1))[0]

    monkeypatch.setitem(SAMPLERS, "toy_adaptive", toy_adaptive)
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="toy_adaptive")
    sch.set_timesteps(STEPS)
    with pytest.raises(RuntimeError, match="depend on the model"):
        _drive(sch, X_T)
    assert not _workers()


FLOW_DYNAMIC = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
BAD = {
    "unknown sampler": (lambda: ProjectScheduler.from_scheduler(_toy_base(), sampler="dpmpp_9m"), "unknown sampler"),
    "adaptive sampler": (lambda: ProjectScheduler.from_scheduler(_toy_base(), sampler="dpm_adaptive"), "fixed-grid"),
    "sampler option": (lambda: ProjectScheduler.from_scheduler(_toy_base(), sampler="ddim",
                                                               sampler_options={"order": 2}), "has no option 'order'"),
    "grid": (lambda: ProjectScheduler.from_scheduler(_toy_base(), time_grid="cosine"), "unknown time grid"),
    "grid option": (lambda: ProjectScheduler.from_scheduler(_toy_base(), time_grid="karras",
                                                            grid_options={"rh0": 7}), "no option 'rh0'"),
    "seed": (lambda: ProjectScheduler.from_scheduler(_toy_base(), seed="7"), "seed must be an int"),
    "no wrapped config": (lambda: ProjectScheduler(sampler="ddim"), "from_scheduler"),
    "unsupported scheduler": (lambda: ProjectScheduler(scheduler_config={"_class_name": "FooScheduler"}),
                              "unsupported diffusers scheduler"),
    "grid twice": (lambda: ProjectScheduler.from_scheduler(_toy_base(), time_grid="log_snr").set_timesteps(
        sigmas=[10.0, 1.0]), "both choose the time grid"),
    "no steps": (lambda: ProjectScheduler.from_scheduler(_toy_base()).set_timesteps(), "num_inference_steps"),
    "two grids": (lambda: ProjectScheduler.from_scheduler(_toy_base(), time_grid="karras", timesteps=[1.0, 0.5, 0.0]),
                  "one of time_grid, timesteps or sigmas"),
    "grid options on times": (lambda: ProjectScheduler.from_scheduler(_toy_base(), timesteps=[1.0, 0.0],
                                                                      grid_options={"rho": 7}), "named time_grid"),
    "bad times": (lambda: ProjectScheduler.from_scheduler(_toy_base(), timesteps=[0.5, 1.0, 0.0]), "decreasing"),
    "missing grid file": (lambda: ProjectScheduler.from_scheduler(_toy_base(), time_grid="nowhere/grid.json"),
                          "does not exist"),
    "grid twice with times": (lambda: ProjectScheduler.from_scheduler(_toy_base(), timesteps=[1.0, 0.5, 0.0])
                              .set_timesteps(timesteps=[999, 500]), "both choose the time grid"),
    "dynamic shift without mu": (lambda: ProjectScheduler.from_scheduler(FLOW_DYNAMIC).set_timesteps(4), "mu="),
    "step before set_timesteps": (lambda: ProjectScheduler.from_scheduler(_toy_base()).step(X_T, 999, X_T),
                                  "set_timesteps"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_problem(case):
    make, match = BAD[case]
    with pytest.raises((ValueError, RuntimeError), match=match):
        make()


def test_timesteps_out_of_order_raise():
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="ddim")
    sch.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="in order"):
        sch.step(X_T, sch.timesteps[1], X_T)


def test_custom_timesteps_and_sigmas_map_to_the_grid():
    """timesteps= are network time signals, sigmas= EDM sigmas of a beta table; both get t = 0 appended."""
    schedule = schedule_from_diffusers(_toy_base())
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="ddim")
    sch.set_timesteps(timesteps=[999, 500, 100])
    torch.testing.assert_close(sch.timesteps, torch.tensor([999.0, 500.0, 100.0]))
    ts = schedule.t_from_timestep(torch.tensor([999.0, 500.0]))
    sigmas = schedule.edm_sigma(ts)
    sch.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(sch.timesteps, torch.tensor([999.0, 500.0]), atol=1e-3, rtol=0)
    assert sch.init_noise_sigma == pytest.approx(1.0)
