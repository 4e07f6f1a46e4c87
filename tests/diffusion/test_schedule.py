"""Schedule invariants as identities: VP norm, monotone log-SNR, inverses, derivatives vs autograd."""
import json
import math

import pytest
import torch

from diffusion import get_schedule, schedule_from_diffusers
from diffusion.schedule import SCHEDULES, Discrete, RectifiedFlow, shift_time

ALL = ["vp_linear", "cosine", "ve", "rectified_flow", "sub_vp", "linear", "scaled_linear", "squaredcos_cap_v2"]
VP = ["vp_linear", "cosine", "linear", "scaled_linear", "squaredcos_cap_v2"]


def grid(s, n=257):
    return torch.linspace(1e-3, s.t_max, n, dtype=torch.float64)


@pytest.mark.parametrize("name", VP)
def test_vp_norm(name):
    s = get_schedule(name)
    t = grid(s)
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_endpoints_and_monotone_log_snr(name):
    s = get_schedule(name)
    zero = torch.zeros(1, dtype=torch.float64)
    assert s.alpha(zero).item() == pytest.approx(1.0) and s.sigma(zero).item() == 0.0  # t = 0 is data
    lam = s.log_snr(grid(s))
    assert torch.all(lam[1:] < lam[:-1])


@pytest.mark.parametrize("name", ALL)
def test_t_from_log_snr_round_trip(name):
    s = get_schedule(name)
    t = grid(s)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["vp_linear", "cosine", "ve", "rectified_flow", "sub_vp"])
def test_derivatives_match_autograd(name):
    s = get_schedule(name)
    t = grid(s, 33).requires_grad_(True)
    for f, df in [(s.alpha, s.d_alpha), (s.sigma, s.d_sigma)]:
        out = f(t)
        if not out.requires_grad:  # a constant (VE's alpha = 1)
            assert torch.all(df(t.detach()) == 0)
            continue
        (g,) = torch.autograd.grad(out.sum(), t)
        torch.testing.assert_close(df(t.detach()), g, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_discrete_derivatives_are_segment_slopes(name):
    s = get_schedule(name)
    t = (torch.arange(10, 990, 37, dtype=torch.float64) + 1.5) / 1000  # mid-segment
    t.requires_grad_(True)
    for f, df in [(s.alpha, s.d_alpha), (s.sigma, s.d_sigma)]:
        (g,) = torch.autograd.grad(f(t).sum(), t)
        torch.testing.assert_close(df(t.detach()), g, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_sde_coefficients_reproduce_variance(name):
    """g^2 = d sigma^2/dt - 2 f sigma^2 means sigma^2 solves the variance ODE dv/dt = 2 f v + g^2."""
    s = get_schedule(name)
    t = torch.linspace(0.05, 0.9 * s.t_max, 41, dtype=torch.float64)
    if isinstance(s, Discrete):  # piecewise: difference inside one segment
        t = (torch.arange(50, 900, 21, dtype=torch.float64) + 0.5) / 1000
    h = 1e-7
    dvar = (s.sigma(t + h) ** 2 - s.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(dvar, 2 * s.drift(t) * s.sigma(t) ** 2 + s.diffusion_sq(t), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_sde_diffusion_is_finite_and_continuous_at_data(name):
    """g^2(0) is the t -> 0+ limit (sigma = 0 meets sigma' = inf there for VP/VE: no 0 * inf = NaN), and
    sigma^2 has a finite slope: beta(0) for VP tables, 2 sigma_min^2 log r for VE, 0 for sub-VP and RF."""
    s = get_schedule(name)
    t = torch.tensor([0.0, 1e-10], dtype=torch.float64)
    g2 = s.diffusion_sq(t)
    assert torch.isfinite(g2).all() and g2[0] >= 0
    torch.testing.assert_close(g2[0], g2[1], rtol=1e-6, atol=1e-8)
    if name == "vp_linear":
        assert g2[0].item() == pytest.approx(s.beta_min)
    if name == "ve":
        assert g2[0].item() == pytest.approx(2 * s.sigma_min ** 2 * math.log(s.sigma_max / s.sigma_min))
    if name == "sub_vp":  # sigma_sub = sigma_vp^2 = beta_min t + O(t^2): finite slope at t = 0
        assert s.d_sigma(t[:1]).item() == pytest.approx(s.base.beta_min)


def test_discrete_hits_table_exactly_and_matches_diffusers():
    from diffusers import DDPMScheduler

    for beta_schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        ours = Discrete(beta_schedule)
        ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=ours.beta_start or 1e-4,
                            beta_end=ours.beta_end or 0.02)
        n = torch.arange(1000)
        ab = ours.alpha(ours.t_from_timestep(n)) ** 2
        torch.testing.assert_close(ab, ref.alphas_cumprod.double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.timestep_from_t(ours.t_from_timestep(n)), n.double())


def test_zero_terminal_snr():
    s = Discrete("scaled_linear", rescale_betas_zero_snr=True)
    one = torch.ones(1, dtype=torch.float64)
    assert s.alpha(one).item() == 0.0 and s.log_snr(one).item() == float("-inf")
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


def test_from_diffusers_config(tmp_path):
    cfg = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    s = schedule_from_diffusers(tmp_path)
    assert isinstance(s, Discrete) and s.beta_schedule == "scaled_linear"
    flow = schedule_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert isinstance(flow, RectifiedFlow) and flow.shift == 3.0
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        schedule_from_diffusers(tmp_path / "missing")


def test_shift_time_closed_form():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    st = shift_time(t, 3.0)
    assert st[0] == 0 and st[-1] == 1 and torch.all(st >= t)
    torch.testing.assert_close(shift_time(st, 1 / 3.0), t)  # the inverse shift undoes it


def test_add_noise_broadcasts_per_sample():
    s = get_schedule("vp_linear")
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    xt = s.add_noise(x0, eps, t)
    for i in range(3):
        torch.testing.assert_close(xt[i], s.alpha(t[i]) * x0[i] + s.sigma(t[i]) * eps[i])


def test_bad_input():
    with pytest.raises(ValueError, match="valid"):
        get_schedule("nope")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_schedule("vp").alpha(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="beta_schedule"):
        Discrete("quadratic")
    assert set(SCHEDULES) >= {"vp_linear", "cosine", "ve", "rectified_flow", "discrete"}
