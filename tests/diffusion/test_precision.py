"""Half-precision models: schedule coefficients, conversions and sampler time tensors stay in float32/64.

Inputs are rounded to the half dtype first and then treated as exact, so every error measured here is
the code's. With u = 2^-8 (bf16) or 2^-11 (fp16) the dtype's unit roundoff (eps / 2), and for a result
r = sum_k c_k y_k (target and to_x0_eps are linear in their tensor inputs y_k) its size
m = sum_k |c_k| |y_k| (c_k the float64 coefficients), the tolerances, elementwise, are:
* target / to_x0_eps in the half dtype == the float64 result on the same inputs, rounded once:
  |err| <= 1.01 u |r| + 4 * 2^-24 m (float32 arithmetic) + u * smallest normal (fp16 subnormals);
* the round trip target -> to_x0_eps recovers (x0, eps) within the first-order effect of rounding
  both inputs (x_t, target) and the result: |err| <= 1.01 u (m + |result|) + the same two small terms.
Measured worst cases reach 0.94-1.00 of these bounds (the float64 -> half rounding itself).
"""
import pytest
import torch

import diffusion as d
from diffusion import PREDICTIONS, get_schedule, target, to_x0_eps
from diffusion.gmm import random_mixture

HALF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff u
DIM = 32


def _times():
    """t = 0 and every table step t = (n + 1) / 1000, n = 0..999 (a 1001-point grid on [0, 1] for continuous schedules)."""
    return torch.arange(1001, dtype=torch.float64) / 1000


def _excess(out, ref, bound, u, dtype, size):
    """max of |out - ref| / tolerance (<= 1 passes), see the module docstring."""
    tol = 1.01 * bound + 4 * 2.0 ** -24 * size + u * torch.finfo(dtype).smallest_normal
    return ((out.double() - ref.double()).abs() / tol).max().item()


@pytest.mark.parametrize("name", ["scaled_linear", "vp_linear", "rectified_flow"])
@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_half_precision_target_and_conversion_at_every_step(kind, dtype, name):
    s, u = get_schedule(name), HALF[dtype]
    t = _times()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), DIM, generator=g, dtype=torch.float64).to(dtype)  # exact in the half dtype
    eps = torch.randn(len(t), DIM, generator=g, dtype=torch.float64).to(dtype)
    one, zero = torch.ones(len(t), DIM, dtype=torch.float64), torch.zeros(len(t), DIM, dtype=torch.float64)

    ref_target = target(kind, x0.double(), eps.double(), t, s)
    defined = torch.isfinite(ref_target).all(1)  # e.g. score at sigma = 0 is not
    tgt = target(kind, x0, eps, t, s)
    assert tgt.dtype == dtype
    assert torch.isfinite(tgt[defined]).all(), f"target not finite at t = {t[defined & ~torch.isfinite(tgt).all(1)]}"
    size = (target(kind, one, zero, t, s).abs() * x0.double().abs() + target(kind, zero, one, t, s).abs() * eps.double().abs())
    r = ref_target[defined]
    assert _excess(tgt[defined], r, u * r.abs(), u, dtype, size[defined]) <= 1.0

    x_t = s.add_noise(x0.double(), eps.double(), t).to(dtype)
    ref = to_x0_eps(kind, tgt.double(), x_t.double(), t, s)
    c_x, c_o = to_x0_eps(kind, zero, one, t, s), to_x0_eps(kind, one, zero, t, s)  # coefficients of x_t, output
    defined &= torch.isfinite(torch.cat(ref, 1)).all(1)  # e.g. eps models at alpha = 0
    out = to_x0_eps(kind, tgt, x_t, t, s)
    for o, r, cx, co, truth in zip(out, ref, c_x, c_o, (x0, eps)):
        assert o.dtype == dtype
        o, r, truth = o[defined], r[defined], truth[defined].double()
        assert torch.isfinite(o).all()
        size = cx[defined].abs() * x_t[defined].double().abs() + co[defined].abs() * tgt[defined].double().abs()
        assert _excess(o, r, u * r.abs(), u, dtype, size) <= 1.0  # the float64 conversion, rounded once
        assert _excess(o, truth, u * (size + o.double().abs()), u, dtype, size) <= 1.0  # round trip


@pytest.mark.parametrize("name", ["scaled_linear", "vp_linear", "cosine", "ve", "rectified_flow"])
def test_schedule_at_half_precision_t_is_evaluated_in_float32(name):
    """A half-precision t is upcast (Discrete interpolates in float64): the coefficients equal the float64
    ones at the same (rounded) t to float32 precision (rtol 1e-5: exp / cos lose a few float32 ulps),
    never to half precision (rtol 2^-9)."""
    s = get_schedule(name)
    t = torch.linspace(1e-3, 1.0, 4000, dtype=torch.float64).to(torch.bfloat16).unique()  # every bf16 time
    for f in (s.alpha, s.sigma, s.d_alpha, s.d_sigma):
        low, ref = f(t), f(t.double())
        assert low.dtype == torch.float32
        fin = torch.isfinite(ref)
        torch.testing.assert_close(low[fin].double(), ref[fin], rtol=1e-5, atol=1e-6 * ref[fin].abs().max().item())


@pytest.mark.parametrize("kind", ["velocity", "v"])
def test_loss_evaluates_the_schedule_at_float64_t(kind):
    """DiffusionLoss at every table step of an SD table, with a net returning the exact target: the loss is
    float32 rounding (a float32 t lands beside the knot, where the table's velocity slope jumps)."""
    s = get_schedule("scaled_linear")
    t = s.t_from_timestep(torch.arange(1000))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1000, DIM, generator=g, dtype=torch.float64), torch.randn(1000, DIM, generator=g, dtype=torch.float64)
    exact = target(kind, x0, eps, t, s)
    loss = d.DiffusionLoss(s, kind, time_input="timestep")
    per_sample = loss(lambda x, signal: exact.float(), x0.float(), t=t, eps=eps.float(), reduction="none")
    assert (per_sample / exact.pow(2).mean(1)).max() < 1e-12  # float32 rounding: ~1e-14


class _ExactEpsNet:
    """A 'network' running in the input's dtype: reads the integer timestep it is given, returns the exact
    eps prediction of a Gaussian mixture, computed in float64 and rounded to x's dtype."""

    def __init__(self, schedule, mixture):
        self.schedule, self.mixture, self.timesteps = schedule, mixture, []

    def __call__(self, x, timestep):
        self.timesteps.append(timestep)
        t = self.schedule.t_from_timestep(timestep.double()).clamp(0, 1)  # out-of-range inputs are asserted on
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        x0 = self.mixture.posterior_mean(x.double(), a, s)
        return ((x.double() - a[:, None] * x0) / s[:, None]).to(x.dtype)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_bf16_sampling_matches_float32(sampler):
    s = get_schedule("scaled_linear")
    gm = random_mixture(DIM, 8, seed=1)
    x_T = d.prior_sample((64, DIM), s, generator=0, dtype=torch.bfloat16)
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        net = _ExactEpsNet(s, gm)
        runs[dtype] = d.sample(d.wrap_model(net, s, "eps"), x_T.to(dtype), s, sampler=sampler, steps=15)
        seen = torch.cat(net.timesteps)
        assert seen.dtype in (torch.float32, torch.float64), seen.dtype  # the time signal is never half
        assert 0 <= seen.min() and seen.max() <= 999, (seen.min().item(), seen.max().item())
    low, ref = runs[torch.bfloat16], runs[torch.float32]
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    err = (low.float() - ref).abs()
    # measured: max 0.055 / rms 0.0055 (dpmpp_2m), max 0.044 / rms 0.0038 (ddim) on samples of std 0.26:
    # 15 steps of a bf16 state (one rounding: rms 0.0004) and the eps -> x0 conversion's 1 / alpha(1) = 15
    assert err.max() < 0.1 and err.pow(2).mean().sqrt() < 0.01, (err.max().item(), err.pow(2).mean().sqrt().item())


def test_bf16_dit_sees_float_timesteps_in_range():
    """Our DiT in bf16 through wrap_model: it embeds the float32 timestep signal, never a rounded 1000."""
    from diffusion.models.dit import DiT
    s = get_schedule("scaled_linear")
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
              num_classes=0).to(torch.bfloat16).eval()
    seen = []
    net.t_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x_T = d.prior_sample((2, 4, 8, 8), s, generator=0, dtype=torch.bfloat16)
    with torch.no_grad():
        out = d.sample(d.wrap_model(net, s, "eps"), x_T, s, sampler="dpmpp_2m", steps=3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    seen = torch.cat(seen)
    assert seen.dtype == torch.float32 and seen.max() == 999 and seen.min() >= 0
