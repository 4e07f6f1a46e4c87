"""ProjectScheduler (diffusion/scheduler_adapter.py): project samplers inside diffusers pipelines.

Tiny random-weight pipelines (StableDiffusion, StableDiffusionControlNet, StableDiffusion3 flow matching) with
`pipe.scheduler = ProjectScheduler.from_scheduler(...)` return the latents diffusion.sample() gives for the same
network, guidance and start latents (named, explicit and fitted grids); plus diffusers' own DDIM / FlowMatchEuler
reproduced inside a pipeline and config round trips. The step loop itself on a toy network:
test_scheduler_adapter_loop.py."""
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
from tests.controlnet.sd_fixtures import RES, tiny_sd  # noqa: E402
from tests.controlnet.tiny import randomize  # noqa: E402
from tests.diffusion.test_scheduler_adapter_loop import _toy_base  # noqa: E402

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
