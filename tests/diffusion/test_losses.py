"""Training objective (diffusion/losses.py): SD3 timestep densities and target identities."""
import math

import pytest
import torch

from diffusion import get_schedule, shift_time, target, to_x0_eps
from diffusion.losses import (DENSITIES, DiffusionLoss, cosmap, density_pdf, mode_inverse, mode_map,
                              resolution_shift, sample_timesteps)

G = lambda s=0: torch.Generator().manual_seed(s)  # noqa: E731


# ----------------------------------------------------------------------------------------------- densities
@pytest.mark.parametrize("density", DENSITIES)
def test_density_histogram_matches_closed_form(density):
    t = sample_timesteps(density, 200_000, G(1), dtype=torch.float64)
    assert t.shape == (200_000,) and t.min() >= 0 and t.max() <= 1
    hist = torch.histc(t, 20, 0, 1) / len(t) * 20
    centers = (torch.arange(20, dtype=torch.float64) + 0.5) / 20
    pdf = density_pdf(density, centers)
    # bin averages vs the pdf at bin centers: within sampling noise and curvature
    assert torch.allclose(hist, pdf, rtol=0.06, atol=0.02), (hist, pdf)
    # each pdf integrates to 1 on (0, 1)
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    assert abs(density_pdf(density, grid).mean().item() - 1) < 2e-3


def test_logit_normal_median_and_moments():
    t = sample_timesteps("logit_normal", 100_000, G(2), dtype=torch.float64)
    assert abs(t.median().item() - 0.5) < 0.01
    z = torch.log(t) - torch.log1p(-t)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    t = sample_timesteps("logit_normal", 100_000, G(3), dtype=torch.float64, logit_mean=0.5, logit_std=0.6)
    z = torch.log(t) - torch.log1p(-t)
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(0.5)).item()) < 0.01
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.6) < 0.02


def test_mode_density_closed_form():
    # SD3 eq. 20: f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u); pdf = 1 / |f'(f^-1(t))|
    s = 1.29
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(mode_map(u, s), 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u))
    assert mode_map(torch.tensor(0.0), s) == 1 and abs(mode_map(torch.tensor(1.0), s)) < 1e-12
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    assert torch.allclose(mode_map(mode_inverse(t, s), s), t, atol=1e-12)
    # at the mode t = 1/2 (u = 1/2): f' = -1 - s + s pi / 2
    assert abs(density_pdf("mode", 0.5, mode_scale=s).item() - 1 / (1 + s - s * math.pi / 2)) < 1e-9
    # scale 0 is uniform; positive scales put more mass in the middle
    assert torch.allclose(density_pdf("mode", t, mode_scale=0.0), torch.ones_like(t))
    assert density_pdf("mode", 0.5, mode_scale=1.0) > density_pdf("mode", 0.05, mode_scale=1.0)
    with pytest.raises(ValueError, match="mode_scale"):
        sample_timesteps("mode", 4, mode_scale=2.0)


def test_cosmap_mapping():
    # SD3 eq. 21: t = 1 - 1 / (tan(pi u / 2) + 1) puts RF time at the cosine schedule's log-SNR:
    # lambda_RF(t) = 2 log((1 - t) / t) = 2 log(cot(pi u / 2)) = lambda_cos(u)
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    t = cosmap(u)
    assert torch.allclose(2 * torch.log((1 - t) / t), 2 * torch.log(1 / torch.tan(math.pi / 2 * u)), atol=1e-10)
    assert torch.allclose(get_schedule("rf").log_snr(t), -2 * torch.log(torch.tan(math.pi / 2 * u)), atol=1e-9)
    assert abs(cosmap(torch.tensor(0.5)).item() - 0.5) < 1e-12


def test_resolution_shift():
    assert resolution_shift(256) == 1.0 and resolution_shift(1024) == 4.0
    assert resolution_shift(64, 64, base_height=32) == 2.0
    # shifted t keeps the base resolution's SNR for an image sqrt(m/n) larger: noise std scales by alpha
    a, tn = 3.0, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    tm = shift_time(tn, a)
    assert torch.allclose(tm / (1 - tm), a * tn / (1 - tn))
    with pytest.raises(ValueError):
        resolution_shift(0)


def test_training_shift_and_ranges():
    rf = get_schedule("rectified_flow", shift=3.0)
    loss = DiffusionLoss(rf, density="uniform")
    assert loss.shift == 3.0
    t = loss.sample_t(50_000, G(4))
    assert abs(t.median().item() - shift_time(torch.tensor(0.5), 3.0).item()) < 0.01
    cos = DiffusionLoss(get_schedule("cosine"), "eps", density="uniform")
    assert cos.sample_t(10_000, G(5)).max() <= cos.schedule.t_max
    disc = DiffusionLoss(get_schedule("scaled_linear"), "eps", density="uniform")
    n = disc.schedule.timestep_from_t(disc.sample_t(1000, G(6)).double())
    assert torch.allclose(n, n.round(), atol=1e-3) and n.min() >= 0 and n.max() <= 999
    with pytest.raises(ValueError, match="valid"):
        DiffusionLoss(rf, density="gaussian")
    with pytest.raises(ValueError, match="valid"):
        DiffusionLoss(rf, weighting="snr2")


# ----------------------------------------------------------------------------------------------- loss identities
class Oracle(torch.nn.Module):
    """Returns target(kind, x0, eps, t) for the (x0, eps) it was given: a perfect predictor."""

    def __init__(self, schedule, kind, x0, eps, signal="t1000"):
        super().__init__()
        self.schedule, self.kind, self.x0, self.eps = schedule, kind, x0, eps
        self.calls = []

    def forward(self, x_t, signal, **cond):
        t = signal / 1000
        self.calls.append((x_t, t, cond))
        return target(self.kind, self.x0, self.eps, t, self.schedule)


@pytest.mark.parametrize("schedule,kind", [("rectified_flow", "velocity"), ("vp_linear", "eps"), ("vp_linear", "v"),
                                           ("cosine", "x0"), ("cosine", "v"), ("rectified_flow", "eps"),
                                           ("vp_linear", "velocity")])
def test_perfect_predictor_has_zero_loss(schedule, kind):
    sch = get_schedule(schedule)
    x0, eps = torch.randn(6, 2, 4, 4, generator=G(7)), torch.randn(6, 2, 4, 4, generator=G(8))
    net = Oracle(sch, kind, x0, eps)
    for weighting in ("none", "min_snr"):
        loss = DiffusionLoss(sch, kind, "logit_normal", weighting=weighting)
        assert loss(net, x0, eps=eps, generator=G(9)).item() < 1e-10
    # the network saw x_t = alpha x0 + sigma eps at the signal 1000 t, and (x0, eps) round-trip
    x_t, t, _ = net.calls[-1]
    assert torch.allclose(x_t, sch.add_noise(x0, eps, t), atol=1e-6)
    x0_hat, eps_hat = to_x0_eps(kind, target(kind, x0, eps, t, sch), x_t, t, sch)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, eps, atol=1e-3)


def test_rf_velocity_target_identity():
    rf = get_schedule("rf")
    x0, eps = torch.randn(4, 3, 2, 2, generator=G(10)), torch.randn(4, 3, 2, 2, generator=G(11))
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    assert torch.allclose(target("velocity", x0, eps, t, rf), eps - x0)  # SD3: v = eps - x0
    # loss of a constant-zero net equals E||eps - x0||^2 and is independent of t for RF
    zero = lambda x, s, **c: torch.zeros_like(x)  # noqa: E731
    per = DiffusionLoss(rf, "velocity", "uniform")(zero, x0, t=t, eps=eps, reduction="none")
    assert torch.allclose(per, (eps - x0).pow(2).flatten(1).mean(1))


def test_eps_and_v_loss_values_on_vp():
    vp = get_schedule("vp_linear")
    x0, eps = torch.randn(5, 1, 3, 3, generator=G(12)), torch.randn(5, 1, 3, 3, generator=G(13))
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
    zero = lambda x, s, **c: torch.zeros_like(x)  # noqa: E731
    a, s = vp.alpha(t).view(-1, 1, 1, 1), vp.sigma(t).view(-1, 1, 1, 1)
    eps_loss = DiffusionLoss(vp, "eps")(zero, x0, t=t, eps=eps, reduction="none")
    assert torch.allclose(eps_loss, eps.pow(2).flatten(1).mean(1))
    v_loss = DiffusionLoss(vp, "v")(zero, x0, t=t, eps=eps, reduction="none")
    assert torch.allclose(v_loss, (a * eps - s * x0).pow(2).flatten(1).mean(1), atol=1e-6)
    # an eps-model off by delta: eps-loss = delta^2; min-SNR weight min(SNR, 5)/SNR (Hang et al. 2023)
    delta = 0.1
    off = lambda x, sig, **c: target("eps", x0, eps, sig / 1000, vp) + delta  # noqa: E731
    w_loss = DiffusionLoss(vp, "eps", weighting="min_snr")(off, x0, t=t, eps=eps, reduction="none")
    snr = (a / s).flatten() ** 2
    assert torch.allclose(w_loss, delta ** 2 * snr.clamp(max=5) / snr, rtol=1e-4)
    # the same model error measured as v: min-SNR weight in x0 units is min(SNR, 5)/(SNR + 1)
    w = DiffusionLoss(vp, "v", weighting="min_snr").weights(t)
    assert torch.allclose(w, snr.clamp(max=5) / (snr + 1), rtol=1e-4)


def test_timestep_input_and_conditioning_passthrough():
    rf = get_schedule("rf")
    seen = {}

    def net(x, signal, y=None):
        seen.update(signal=signal, y=y)
        return torch.zeros_like(x)

    x0 = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0.25, 0.5, 0.75])
    DiffusionLoss(rf, time_input="t1000")(net, x0, t=t, y=torch.tensor([1, 2, 3]))
    assert torch.allclose(seen["signal"], 1000 * t) and seen["y"].tolist() == [1, 2, 3]
    DiffusionLoss(get_schedule("scaled_linear"), "eps", time_input="auto")(net, x0, t=torch.tensor([0.001, 0.5, 1.0]))
    assert torch.allclose(seen["signal"].double(), torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64), atol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        DiffusionLoss(rf)(lambda x, s: x[:, :0], x0)


@pytest.mark.parametrize("name", ["scaled_linear", "rf", "vp"])
def test_default_time_signal_same_in_training_and_sampling(name):
    """A net trained with DiffusionLoss's defaults and sampled through wrap_model's defaults sees one signal."""
    from diffusion import wrap_model

    schedule, seen = get_schedule(name), []

    def net(x, signal):
        seen.append(signal.double())
        return torch.zeros_like(x)

    t = torch.tensor([0.001, 0.25, 0.5, 1.0])
    x0 = torch.randn(4, 1, 2, 2)
    DiffusionLoss(schedule, "eps", "uniform")(net, x0, t=t)
    wrap_model(net, schedule, "eps")(x0, t)
    torch.testing.assert_close(seen[0], seen[1])
