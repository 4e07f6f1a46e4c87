"""(x0, eps) conversions: every kind round-trips in float64 for every schedule."""
import pytest
import torch

from diffusion import PREDICTIONS, get_schedule, target, to_x0_eps
from diffusion.interop import prediction_from_diffusers
from diffusion.prediction import check_prediction

NAMES = ["vp_linear", "cosine", "ve", "rectified_flow", "scaled_linear"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_target_then_convert_is_identity(name, kind):
    s = get_schedule(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.95], dtype=torch.float64) * s.t_max
    xt = s.add_noise(x0, eps, t)
    x0_hat, eps_hat = to_x0_eps(kind, target(kind, x0, eps, t, s), xt, t, s)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_known_forms():
    s = get_schedule("rectified_flow")
    x0, eps = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(target("velocity", x0, eps, t, s), eps - x0)  # SD3's target
    vp = get_schedule("vp_linear")
    a, sg = vp.alpha(t)[:, None], vp.sigma(t)[:, None]
    torch.testing.assert_close(target("v", x0, eps, t, vp), a * eps - sg * x0)
    torch.testing.assert_close(target("score", x0, eps, t, vp), -eps / sg)


def test_rf_velocity_at_pure_noise():
    """alpha(1) = 0 for rectified flow: velocity still converts (det = 1)."""
    s = get_schedule("rectified_flow")
    x0, eps = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    t = torch.ones(2, dtype=torch.float64)
    x0_hat, eps_hat = to_x0_eps("velocity", eps - x0, s.add_noise(x0, eps, t), t, s)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_names_and_errors():
    assert check_prediction("epsilon") == "eps" and check_prediction("v_prediction") == "v"
    assert prediction_from_diffusers({"_class_name": "DDIMScheduler", "prediction_type": "sample"}) == "x0"
    assert prediction_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler"}) == "velocity"
    s = get_schedule("vp")
    with pytest.raises(ValueError, match="valid"):
        to_x0_eps("noise", torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1) * 0.5, s)
    with pytest.raises(ValueError, match="shape"):
        to_x0_eps("eps", torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1) * 0.5, s)
