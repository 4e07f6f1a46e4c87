"""diffusers schedulers -> schedule / prediction / time signal (diffusion/interop.py), checked against diffusers'
own alphas_cumprod and sigmas, for a live object and for every saved form of its config."""
import inspect
import json
import math
import types

import pytest
import torch

import diffusers
from diffusion import VE, Discrete, RectifiedFlow, shift_time, time_signal
from diffusion.interop import (SUPPORTED_SCHEDULERS, dynamic_shift_mu, prediction_from_diffusers,
                               schedule_from_diffusers, time_input_from_diffusers)
from diffusion.timesteps import timesteps_karras

F64 = torch.float64


def _cls(name):
    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")
    return getattr(diffusers, name)


@pytest.mark.parametrize("name", sorted(SUPPORTED_SCHEDULERS))
def test_fallback_defaults_are_the_classes_defaults(name):
    """Keys missing from a config dict take the diffusers class's own constructor default."""
    params = inspect.signature(_cls(name).__init__).parameters
    defaults = SUPPORTED_SCHEDULERS[name][1]
    checked = {k: v for k, v in defaults.items() if k in params}
    assert checked and all(params[k].default == v for k, v in checked.items()), (name, checked)


# a non-default configuration per class, so that defaults cannot hide a mistake
TABLE_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
LIVE = {name: TABLE_KW for name, (fam, _) in SUPPORTED_SCHEDULERS.items() if fam == "table"}
LIVE["RePaintScheduler"] = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LIVE.update({"DDIMScheduler": dict(TABLE_KW, rescale_betas_zero_snr=True),
             "EulerDiscreteScheduler": dict(TABLE_KW, rescale_betas_zero_snr=True),
             "DDPMScheduler": dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
             "FlowMatchEulerDiscreteScheduler": dict(shift=3.0), "FlowMatchHeunDiscreteScheduler": dict(shift=2.0),
             "FlowMatchLCMScheduler": dict(shift=1.5), "ScoreSdeVeScheduler": dict(sigma_min=0.02, sigma_max=300.0),
             "EDMEulerScheduler": dict(sigma_max=60.0), "EDMDPMSolverMultistepScheduler": dict(sigma_min=0.004)})


def _sources(obj, tmp_path):
    """The same scheduler as: live object, pipeline object, config dict, json file, scheduler dir, pipeline dir."""
    obj.save_config(tmp_path / "pipe" / "scheduler")
    f = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    return [obj, types.SimpleNamespace(scheduler=obj), json.loads(f.read_text()), f, f.parent, tmp_path / "pipe",
            str(tmp_path / "pipe")]


def _check_against_diffusers(name, obj, schedule):
    family = SUPPORTED_SCHEDULERS[name][0]
    cfg = obj.config
    if family == "table":
        assert isinstance(schedule, Discrete) and schedule.num_train_timesteps == cfg.num_train_timesteps
        n = torch.arange(cfg.num_train_timesteps)
        ab = schedule.alpha(schedule.t_from_timestep(n)) ** 2
        torch.testing.assert_close(ab, obj.alphas_cumprod.to(F64), rtol=2e-6, atol=1e-7)  # theirs: float32
        assert schedule.rescale_betas_zero_snr == bool(cfg.get("rescale_betas_zero_snr", False))
    elif family == "flow":
        assert isinstance(schedule, RectifiedFlow)
        # training sigmas = the SD3 shift of n / N, and the network sees N sigma (t1000)
        u = torch.arange(cfg.num_train_timesteps, 0, -1, dtype=F64) / cfg.num_train_timesteps
        torch.testing.assert_close(shift_time(u, schedule.shift), obj.sigmas[: len(u)].to(F64), rtol=1e-6, atol=1e-6)
        sig = obj.sigmas[: len(u)].to(F64)
        torch.testing.assert_close(schedule.sigma(sig), sig)
        torch.testing.assert_close(schedule.alpha(sig), 1 - sig)
        torch.testing.assert_close(time_signal(schedule, sig, time_input_from_diffusers(obj)),
                                   obj.timesteps[: len(u)].to(F64), rtol=1e-5, atol=1e-3)
    else:  # VE / EDM: alpha = 1 and every sigma of the scheduler's grid is reached, sigma(1) = sigma_max
        assert isinstance(schedule, VE)
        if family == "ve":
            obj.set_sigmas(12)
            sig = obj.sigmas.to(F64)
        else:
            obj.set_timesteps(12)
            sig = obj.sigmas[:-1].to(F64)
            karras = schedule.edm_sigma(timesteps_karras(12, schedule, sigma_min=cfg.sigma_min)[:-1])
            torch.testing.assert_close(karras, sig, rtol=1e-5, atol=0)  # the scheduler's own grid, from ours
        t = schedule.t_from_edm_sigma(sig)
        assert t.min() > 0 and t.max() <= 1
        torch.testing.assert_close(schedule.sigma(t), sig, rtol=1e-9, atol=0)
        torch.testing.assert_close(schedule.alpha(t), torch.ones_like(t))
        assert math.isclose(float(schedule.sigma(torch.ones(1, dtype=F64))), cfg.sigma_max, rel_tol=1e-12)


@pytest.mark.parametrize("name", sorted(SUPPORTED_SCHEDULERS))
def test_every_supported_scheduler_live_and_saved(name, tmp_path):
    obj = _cls(name)(**LIVE[name])
    family = SUPPORTED_SCHEDULERS[name][0]
    expected_pred = {"flow": "velocity", "ve": "score", "edm": None}.get(
        family, {"v_prediction": "v", "sample": "x0", "epsilon": "eps"}[obj.config.get("prediction_type", "epsilon")])
    for src in _sources(obj, tmp_path):
        schedule = schedule_from_diffusers(src)
        _check_against_diffusers(name, obj, schedule)
        if expected_pred is None:
            with pytest.raises(ValueError, match="EDM"):
                prediction_from_diffusers(src)
            with pytest.raises(ValueError, match="EDM"):
                time_input_from_diffusers(src)
        else:
            assert prediction_from_diffusers(src) == expected_pred
        assert repr(schedule) == repr(schedule_from_diffusers(obj))


def test_live_flow_match_object_is_rectified_flow_not_ddpm():
    """Regression: a live object's config has no _class_name; it used to become a linear DDPM table + eps."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = schedule_from_diffusers(sched)
    assert isinstance(s, RectifiedFlow) and s.shift == 3.0
    assert prediction_from_diffusers(sched) == "velocity" and time_input_from_diffusers(sched) == "t1000"


def test_prediction_from_pipeline_dir(tmp_path):
    """Regression: prediction_from_diffusers(dir) crashed ('dictionary update sequence element #0')."""
    diffusers.DDIMScheduler(prediction_type="v_prediction").save_config(tmp_path / "scheduler")
    assert prediction_from_diffusers(tmp_path) == "v"


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_dynamic_shifting_with_mu_or_image_size(shift_type):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=shift_type)
    with pytest.raises(ValueError, match="mu= or image_seq_len="):
        schedule_from_diffusers(sched)
    mu = 0.8
    s = schedule_from_diffusers(sched, mu=mu)
    assert s.shift == pytest.approx(math.exp(mu) if shift_type == "exponential" else mu)
    sched.set_timesteps(10, mu=mu)  # diffusers: linspace(sigma_max, sigma_min) then the mu shift
    u = torch.linspace(sched.sigma_max, sched.sigma_min, 10, dtype=F64)
    torch.testing.assert_close(shift_time(u, s.shift), sched.sigmas[:-1].to(F64), rtol=1e-6, atol=1e-6)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    ref = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    assert dynamic_shift_mu(1024) == pytest.approx(ref)
    shift = schedule_from_diffusers(sched, image_seq_len=1024).shift
    assert shift == pytest.approx(math.exp(ref) if shift_type == "exponential" else ref)


def test_flow_sigmas_in_multistep_solvers():
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    s = schedule_from_diffusers(sched)
    assert isinstance(s, RectifiedFlow) and s.shift == 3.0 and prediction_from_diffusers(sched) == "velocity"
    sched.set_timesteps(8)
    u = 1 - torch.linspace(1, 1 / 1000, 9, dtype=F64).flip(0)[:-1]  # diffusers' unshifted flow sigmas
    torch.testing.assert_close(shift_time(u, s.shift).to(F64), sched.sigmas[:-1].to(F64), rtol=1e-6, atol=1e-6)
    eps_flow = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon")
    assert prediction_from_diffusers(eps_flow) == "eps"  # its prediction_type is kept
    with pytest.raises(ValueError, match="pass mu="):
        schedule_from_diffusers(diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, use_dynamic_shifting=True),
                                image_seq_len=1024)


def test_unsupported_and_ambiguous_inputs_raise(tmp_path):
    for cls in ("CMStochasticIterativeScheduler", "IPNDMScheduler", "CogVideoXDDIMScheduler"):
        with pytest.raises(ValueError, match="unsupported diffusers scheduler .*supported: .*DDIMScheduler"):
            schedule_from_diffusers(getattr(diffusers, cls)())
        with pytest.raises(ValueError, match="unsupported"):
            prediction_from_diffusers({"_class_name": cls})
    live = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="_class_name"):
        schedule_from_diffusers(live.config)  # scheduler.config alone does not say which scheduler it is
    with pytest.raises(ValueError, match="_class_name"):
        prediction_from_diffusers({"prediction_type": "epsilon"})
    cases = [(diffusers.EulerDiscreteScheduler(timestep_type="continuous"), "timestep_type"),
             (diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
             (diffusers.FlowMatchEulerDiscreteScheduler(shift_terminal=0.1), "shift_terminal"),
             (diffusers.DDPMScheduler(beta_schedule="sigmoid"), "beta_schedule 'sigmoid'")]
    for obj, msg in cases:
        with pytest.raises(ValueError, match=msg):
            schedule_from_diffusers(obj)
    with pytest.raises(ValueError, match="use_dynamic_shifting=False"):
        schedule_from_diffusers(live, mu=0.5)
    with pytest.raises(ValueError, match="flow-matching"):
        schedule_from_diffusers(diffusers.DDIMScheduler(), image_seq_len=256)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        schedule_from_diffusers(tmp_path / "missing")
    with pytest.raises(TypeError, match="scheduler object"):
        prediction_from_diffusers(3)
