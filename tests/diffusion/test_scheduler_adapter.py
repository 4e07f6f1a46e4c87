"""ProjectScheduler (diffusion/scheduler_adapter.py): project samplers inside diffusers pipelines.

Tiny random-weight pipelines (StableDiffusion, StableDiffusionControlNet, StableDiffusion3 flow matching) with
`pipe.scheduler = ProjectScheduler.from_scheduler(...)` return the latents diffusion.sample() gives for the same
network, guidance and start latents; plus diffusers' own DDIM / FlowMatchEuler reproduced inside a pipeline,
img2img starts, seeds, latents edited between steps, errors, worker lifetime and config round trips."""
import copy
import gc
import threading

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (ControlNetModel, DDIMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionControlNetPipeline,
                       StableDiffusionPipeline)

from diffusion import (FittedGrid, ProjectScheduler, classifier_free_guidance, count_nfe, get_timesteps,  # noqa: E402
                       prediction_from_diffusers, sample, schedule_from_diffusers, time_input_from_diffusers,
                       wrap_model)
from diffusion.samplers import SAMPLERS  # noqa: E402
from tests.controlnet.sd_fixtures import RES, tiny_sd  # noqa: E402
from tests.controlnet.tiny import randomize  # noqa: E402

STEPS, SCALE, ATOL = 5, 3.0, 1e-5


def _reference(base, net, sampler, latents, cond, uncond, generator=None, time_grid=None, **options):
    """diffusion.sample() of `net` wrapped for the diffusers scheduler `base`, with classifier-free guidance."""
    schedule = schedule_from_diffusers(base)
    model_fn = wrap_model(net, schedule, prediction_from_diffusers(base), time_input=time_input_from_diffusers(base))
    with torch.no_grad():
        return sample(classifier_free_guidance(model_fn, SCALE, uncond=uncond), latents, schedule, sampler=sampler,
                      steps=STEPS, time_grid=time_grid, cond=cond, generator=generator, **options)


def _seeds(stochastic):
    return [torch.Generator().manual_seed(s) for s in (11, 12)] if stochastic else None


# --- Stable Diffusion ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd():
    """Tiny SD1.5-layout pipeline (v-prediction: random weights keep x0 = alpha x - sigma v of order 1)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd("v_prediction"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pos, neg = pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True, ["", ""])
    latents = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    return pipe, pipe.scheduler, pos, neg, latents


def _sd_call(pipe, pos, neg, latents, generator=None, steps=STEPS, **kw):
    return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, latents=latents, num_inference_steps=steps,
                guidance_scale=SCALE, output_type="latent", generator=generator, **kw).images


SD_CASES = [("ddim", {}, False), ("dpmpp_2m", dict(time_grid="log_snr"), False),
            ("unipc", dict(sampler_options={"order": 3}), False), ("heun", {}, False), ("ddpm", {}, True)]


@pytest.mark.parametrize("sampler, options, stochastic", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_sd_pipeline_equals_sample(sd, sampler, options, stochastic):
    pipe, base, pos, neg, latents = sd
    pipe.scheduler = ProjectScheduler.from_scheduler(base, sampler=sampler, **options)
    out = _sd_call(pipe, pos, neg, latents, generator=_seeds(stochastic))
    assert len(pipe.scheduler.timesteps) == count_nfe(sampler, STEPS)
    assert pipe.scheduler.order == (2 if sampler == "heun" else 1)

    def net(x, s, **c):
        return pipe.unet(x, s, **c, return_dict=False)[0]

    ref = _reference(base, net, sampler, latents, {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg},
                     generator=_seeds(stochastic), time_grid=options.get("time_grid"),
                     **options.get("sampler_options", {}))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def _grid_case(kind, schedule, tmp_path):
    """A 5-step grid off the named ones (log_snr with its interior times moved), given as times, EDM sigmas or a
    fitted-grid JSON file: the scheduler options and sample()'s options that name it."""
    ts = get_timesteps("log_snr", STEPS, schedule)
    ts[1:-1] = ts[1:-1] * torch.linspace(0.9, 1.1, STEPS - 1, dtype=torch.float64)
    if kind == "timesteps":
        return dict(timesteps=ts.tolist()), dict(timesteps=ts)
    if kind == "sigmas":
        sigmas = schedule.edm_sigma(ts[:-1]).tolist() + [0.0]
        return dict(sigmas=sigmas), dict(sigmas=sigmas)
    path = FittedGrid(ts, "dpmpp_2m", STEPS, repr(schedule)).save(tmp_path / "fitted.json")
    return dict(time_grid=str(path)), dict(time_grid=str(path))


@pytest.mark.parametrize("kind", ["timesteps", "sigmas", "json"])
def test_explicit_and_fitted_grids_equal_sample(sd, kind, tmp_path):
    """Any grid sample() takes (times, EDM sigmas, a fitted-grid .json path) drives the pipeline on that grid."""
    pipe, base, pos, neg, latents = sd
    schedule = schedule_from_diffusers(base)
    ours_kw, sample_kw = _grid_case(kind, schedule, tmp_path)
    pipe.scheduler = ProjectScheduler.from_scheduler(base, sampler="dpmpp_2m", **ours_kw)
    out = _sd_call(pipe, pos, neg, latents)
    model_fn = wrap_model(lambda x, s, **c: pipe.unet(x, s, **c, return_dict=False)[0], schedule,
                          prediction_from_diffusers(base), time_input=time_input_from_diffusers(base))
    with torch.no_grad():
        ref = sample(classifier_free_guidance(model_fn, SCALE, uncond={"encoder_hidden_states": neg}), latents,
                     schedule, "dpmpp_2m", cond={"encoder_hidden_states": pos}, **sample_kw)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    pipe.scheduler.save_config(tmp_path / "saved")  # the grid survives a save (float64 lists in the config)
    loaded = ProjectScheduler.from_pretrained(tmp_path / "saved")
    loaded.set_timesteps(STEPS)
    torch.testing.assert_close(loaded.timesteps, pipe.scheduler.timesteps, atol=0, rtol=0)
    with pytest.raises(ValueError, match=f"num_inference_steps={STEPS}"):  # the grid fixes the step count
        _sd_call(pipe, pos, neg, latents, steps=STEPS + 1)


def test_ddim_adapter_equals_diffusers_ddim_in_the_pipeline(sd):
    """The adapter is a diffusers scheduler in earnest: ddim on the trailing grid == DDIMScheduler(trailing)."""
    pipe, base, pos, neg, latents = sd
    ddim = DDIMScheduler.from_config(base.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False)
    pipe.scheduler = ddim
    theirs = _sd_call(pipe, pos, neg, latents)
    pipe.scheduler = ProjectScheduler.from_scheduler(ddim, sampler="ddim", time_grid="trailing")
    ours = _sd_call(pipe, pos, neg, latents)
    torch.testing.assert_close(pipe.scheduler.timesteps, ddim.timesteps.float(), atol=0, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_controlnet_pipeline_equals_sample(sd, sampler):
    pipe, base, pos, neg, latents = sd
    controlnet = randomize(ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)),
                           seed=5, std=0.02).eval()
    cn = StableDiffusionControlNetPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, controlnet,
                                           ProjectScheduler.from_scheduler(base, sampler=sampler), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    cn.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    out = _sd_call(cn, pos, neg, latents, image=image)
    control = cn.prepare_image(image, RES, RES, 2, 1, "cpu", torch.float32, do_classifier_free_guidance=False)

    def net(x, s, encoder_hidden_states, controlnet_cond):
        down, mid = controlnet(x, s, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                               conditioning_scale=1.0, return_dict=False)
        return pipe.unet(x, s, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    ref = _reference(base, net, sampler, latents, {"encoder_hidden_states": pos, "controlnet_cond": control},
                     {"encoder_hidden_states": neg})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# --- flow matching (SD3) -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3():
    """Tiny SD3 pipeline: a random MM-DiT; text embeddings passed in (no text encoders), latents out (no VAE)."""
    torch.manual_seed(0)
    transformer = randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=None, qk_norm="rms_norm"), seed=1).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(2, 5, 24, generator=g),
                  negative_prompt_embeds=torch.randn(2, 5, 24, generator=g),
                  pooled_prompt_embeds=torch.randn(2, 12, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(2, 12, generator=g))
    return pipe, embeds, torch.randn(2, 4, 8, 8, generator=g)


def _sd3_call(pipe, embeds, latents, **kw):
    return pipe(**embeds, latents=latents, num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent",
                height=64, width=64, **kw).images


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun", "dpmpp_2m"])
def test_flow_pipeline_equals_sample(sd3, sampler):
    pipe, embeds, latents = sd3
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.scheduler = ProjectScheduler.from_scheduler(base, sampler=sampler)
    out = _sd3_call(pipe, embeds, latents)

    def net(x, s, encoder_hidden_states, pooled_projections):
        return pipe.transformer(hidden_states=x, timestep=s, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]

    ref = _reference(base, net, sampler, latents,
                     {"encoder_hidden_states": embeds["prompt_embeds"],
                      "pooled_projections": embeds["pooled_prompt_embeds"]},
                     {"encoder_hidden_states": embeds["negative_prompt_embeds"],
                      "pooled_projections": embeds["negative_pooled_prompt_embeds"]})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["shift3", "dynamic_mu"])
def test_flow_euler_equals_flowmatch_euler_on_the_pipelines_sigmas(sd3, dynamic):
    """set_timesteps(sigmas=, mu=) as diffusers: the pipeline's flow sigmas shifted by s (or e^mu), then 0."""
    pipe, embeds, latents = sd3
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
    pipe.scheduler = base
    theirs = _sd3_call(pipe, embeds, latents, sigmas=sigmas)
    pipe.scheduler = ProjectScheduler.from_scheduler(base, sampler="flow_euler")
    ours = _sd3_call(pipe, embeds, latents, sigmas=sigmas)
    torch.testing.assert_close(pipe.scheduler.timesteps, base.timesteps, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


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


def test_config_round_trips(sd, tmp_path):
    sch = ProjectScheduler.from_scheduler(_toy_base(), sampler="unipc", time_grid="karras", grid_options={"rho": 5.0},
                                          sampler_options={"order": 3}, seed=4)
    assert sch.config.num_train_timesteps == 1000 and sch.config.prediction_type == "v_prediction"  # mirrors
    sch.save_pretrained(tmp_path / "scheduler")
    loaded = ProjectScheduler.from_pretrained(tmp_path / "scheduler")
    assert dict(loaded.config) == dict(sch.config)
    rewrapped = ProjectScheduler.from_scheduler(loaded, sampler="ddim")
    assert rewrapped.config.scheduler_config == sch.config.scheduler_config
    for s in (sch, loaded):
        s.set_timesteps(STEPS)
    torch.testing.assert_close(loaded.timesteps, sch.timesteps, atol=0, rtol=0)
    # a pipeline saved with it loads it back (model_index.json names diffusion.scheduler_adapter)
    pipe, base = sd[0], sd[1]
    pipe.scheduler = ProjectScheduler.from_scheduler(base, sampler="heun", time_grid="log_snr")
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded.scheduler, ProjectScheduler)
    assert dict(reloaded.scheduler.config) == dict(pipe.scheduler.config)
