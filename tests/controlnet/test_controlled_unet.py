"""ControlledUNet / MultiControlNet tests (Zhang, Rao & Agrawala 2023): composition, CFG, memory behaviour."""
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from controlnet import ControlledUNet, ControlNet, MultiControlNet

from .tiny import make_inputs, make_unet, randomize, unet_inputs


def _pair(name, seed=3):
    """Our ControlNet and diffusers' with the same random weights (zero convs included)."""
    unet = make_unet(name)
    ref = randomize(ControlNetModel.from_unet(unet), seed=seed)
    ours = ControlNet.from_unet(unet)
    ours.load_state_dict(ref.state_dict())
    return unet, ours, ref


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_controlled_unet_matches_diffusers_composition(name):
    unet, ours, ref = _pair(name)
    net = ControlledUNet(unet, ours)
    inp = make_inputs(name)
    with torch.no_grad():
        down, mid = ref(**inp, conditioning_scale=0.7, return_dict=False)
        expected = unet(**unet_inputs(inp), down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        out = net(**inp, conditioning_scale=0.7)
        bare = unet(**unet_inputs(inp)).sample
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out - bare).abs().max() > 1e-3


def test_multi_controlnet_matches_diffusers_and_sums():
    unet, a, ref_a = _pair("sd15", seed=3)
    _, b, ref_b = _pair("sd15", seed=4)
    inp = make_inputs("sd15")
    conds = [inp.pop("controlnet_cond"), torch.rand(2, 3, 64, 64)]
    multi, ref = MultiControlNet([a, b]), MultiControlNetModel([ref_a, ref_b])
    with torch.no_grad():
        d, m = multi(**inp, controlnet_cond=conds, conditioning_scale=[0.5, 1.5])
        rd, rm = ref(**inp, controlnet_cond=conds, conditioning_scale=[0.5, 1.5], return_dict=False)
        da, ma = a(**inp, controlnet_cond=conds[0], conditioning_scale=0.5)
        db, mb = b(**inp, controlnet_cond=conds[1], conditioning_scale=1.5)
    for x, y, p, q in zip(d, rd, da, db):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        torch.testing.assert_close(x, p + q, atol=0, rtol=0)
    torch.testing.assert_close(m, rm, atol=1e-6, rtol=0)
    net = ControlledUNet(unet, [a, b])
    assert isinstance(net.controlnet, MultiControlNet)
    with torch.no_grad():
        out = net(**inp, controlnet_cond=conds, conditioning_scale=[0.5, 1.5])
        expected = unet(**unet_inputs({**inp, "controlnet_cond": None}), down_block_additional_residuals=rd,
                        mid_block_additional_residual=rm).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="list of conditions"):
        multi(**inp, controlnet_cond=conds[0])


def test_guess_mode_cfg_matches_diffusers_pipeline_logic():
    """diffusers (guess mode + CFG): ControlNet on the conditional half only, zeros for the uncond half."""
    unet, ours, ref = _pair("sd15")
    inp = make_inputs("sd15", batch=1)
    x, t, text, img = inp["sample"], inp["timestep"], inp["encoder_hidden_states"], inp["controlnet_cond"]
    empty = torch.zeros_like(text)
    xs, ts, texts = torch.cat([x, x]), torch.cat([t, t]), torch.cat([empty, text])  # diffusers: [uncond | cond]
    with torch.no_grad():
        down, mid = ref(x, t, text, img, conditioning_scale=0.9, guess_mode=True, return_dict=False)
        down = [torch.cat([torch.zeros_like(d), d]) for d in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
        expected = unet(xs, ts, texts, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        net = ControlledUNet(unet, ours)
        mask = torch.tensor([False, True])
        full = net(xs, ts, texts, controlnet_cond=torch.cat([img, img]), conditioning_scale=0.9, guess_mode=True,
                   control_mask=mask)
        half = net(xs, ts, texts, controlnet_cond=img, conditioning_scale=0.9, guess_mode=True, control_mask=mask)
        none = net(xs, ts, texts, controlnet_cond=img, control_mask=torch.tensor([False, False]))
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(half, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(none, unet(xs, ts, texts).sample, atol=0, rtol=0)
    with pytest.raises(ValueError, match="control_mask has 3 entries"):
        net(xs, ts, texts, controlnet_cond=img, control_mask=torch.tensor([True, True, False]))


def test_plain_network_call_and_diffusion_core_cfg():
    unet, ours, _ = _pair("sd15")
    net = ControlledUNet(unet, ours)
    inp = make_inputs("sd15", batch=1)
    x, text, img = inp["sample"], inp["encoder_hidden_states"], inp["controlnet_cond"]
    cond = {"encoder_hidden_states": text, "controlnet_cond": img}
    with torch.no_grad():
        out = net(x, torch.tensor([321.0]), **cond)  # net(x_t, timestep_signal, **cond)
        bare = net(x, torch.tensor([321.0]), encoder_hidden_states=text, controlnet_cond=None)
    assert out.shape == x.shape and not hasattr(out, "sample")
    torch.testing.assert_close(bare, unet(x, 321.0, text).sample, atol=0, rtol=0)

    diffusion = pytest.importorskip("diffusion")
    if not all(hasattr(diffusion, n) for n in ("wrap_model", "classifier_free_guidance", "Discrete", "sample")):
        pytest.skip("diffusion core API not available")
    schedule = diffusion.Discrete()
    model_fn = diffusion.wrap_model(net, schedule, "eps")
    # Core CFG batches [cond | uncond]; control only the conditional rows (diffusers' guess-mode behaviour).
    on, off = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    guided = diffusion.classifier_free_guidance(
        model_fn, 4.0, uncond={"encoder_hidden_states": torch.zeros_like(text), "control_mask": off})
    with torch.no_grad():
        sample = diffusion.sample(guided, x, schedule, sampler="ddim", steps=2,
                                  cond={**cond, "control_mask": on, "guess_mode": True})
    assert sample.shape == x.shape and torch.isfinite(sample).all()


def test_frozen_unet_gets_no_grads_and_builds_no_graph():
    unet, ours, _ = _pair("sdxl")
    net = ControlledUNet(unet, ours).train()
    assert not unet.training and ours.training
    assert all(not p.requires_grad for p in unet.parameters())
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in ours.parameters()}
    grad_flags = []
    hook = unet.down_blocks[0].register_forward_hook(lambda m, i, o: grad_flags.append(o[0].requires_grad))
    inp = make_inputs("sdxl")
    net(**inp).square().mean().backward()
    hook.remove()
    assert grad_flags == [False]  # the UNet encoder path carries no autograd graph
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None for p in ours.parameters())
    assert float(ours.controlnet_mid_block.weight.grad.abs().sum()) > 0


def test_fresh_controlnet_trains_zero_convs_first():
    """At zero init only the zero convs receive non-zero gradients (the paper's argument for zero init)."""
    unet = make_unet("sd15")
    cn = ControlNet.from_unet(unet)
    net = ControlledUNet(unet, cn)
    net(**make_inputs("sd15")).square().mean().backward()
    zero = {id(p) for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block] for p in m.parameters()}
    for name, p in cn.named_parameters():
        assert (float(p.grad.abs().sum()) > 0) == (id(p) in zero), name


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_gradient_checkpointing_gives_identical_grads(name):
    unet, ours, _ = _pair(name)
    net = ControlledUNet(unet, ours)
    inp = make_inputs(name)

    def grads():
        ours.zero_grad(set_to_none=True)
        loss = net(**inp, conditioning_scale=0.8).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in ours.parameters()]

    loss0, g0 = grads()
    ours.enable_gradient_checkpointing()
    recomputed = []
    hook = ours.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, i: recomputed.append(1))
    loss1, g1 = grads()
    hook.remove()
    assert len(recomputed) == 2  # forward + recomputation in backward
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


# ----------------------------------------------------------------------------------------------- guess-mode scales
def test_guess_mode_scale_formulas():
    """diffusers: logspace(-1, 0, n); original ControlNet (cldm.py): 0.825 ** (n - 1 - i), i.e. 0.825 ** (12 - i)."""
    from controlnet.model import guess_mode_weights

    assert torch.equal(guess_mode_weights(13), torch.logspace(-1, 0, 13, dtype=torch.float64))
    assert torch.equal(guess_mode_weights(13, "diffusers"), torch.logspace(-1, 0, 13, dtype=torch.float64))
    assert guess_mode_weights(13, "original").tolist() == [0.825 ** float(12 - i) for i in range(13)]
    assert guess_mode_weights(4, "original").tolist() == [0.825 ** 3, 0.825 ** 2, 0.825, 1.0]
    gap = (guess_mode_weights(13, "original") / guess_mode_weights(13) - 1).abs().max()
    assert 0.005 < gap < 0.007  # the two agree to 0.6%
    with pytest.raises(ValueError, match="valid: .*diffusers.*original"):
        guess_mode_weights(13, "cldm")


@pytest.mark.parametrize("kind", ["diffusers", "original"])
def test_guess_mode_scales_option_reaches_the_residuals(kind):
    from controlnet.model import guess_mode_weights

    unet, ours, _ = _pair("sd15")
    inp = make_inputs("sd15")
    with torch.no_grad():
        d0, m0 = ours(**inp, conditioning_scale=0.7)
        d1, m1 = ours(**inp, conditioning_scale=0.7, guess_mode=True, guess_mode_scales=kind)
        multi = MultiControlNet([ours, ours])(**{**inp, "controlnet_cond": [inp["controlnet_cond"]] * 2},
                                             conditioning_scale=0.7, guess_mode=True, guess_mode_scales=kind)
    s = guess_mode_weights(len(d0) + 1, kind)
    for x, y, si in zip(d0, d1, s):
        torch.testing.assert_close(y, x * float(si), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m1, m0 * float(s[-1]), rtol=1e-6, atol=1e-7)
    for x, y in zip(multi[0], d1):
        torch.testing.assert_close(x, 2 * y)
    with torch.no_grad():
        a = ControlledUNet(unet, ours)(**inp, guess_mode=True, guess_mode_scales=kind)
        b = unet(**unet_inputs(inp), down_block_additional_residuals=[d / 0.7 for d in d1],
                 mid_block_additional_residual=m1 / 0.7).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_only_mid_control_adds_the_mid_residual_only():
    """Original ControlNet's only_mid_control: the UNet gets zero skip residuals and the mid residual."""
    unet, ours, _ = _pair("sd15")
    net = ControlledUNet(unet, ours)
    inp = make_inputs("sd15")
    with torch.no_grad():
        down, mid = ours(**inp, conditioning_scale=20.0)
        out = net(**inp, conditioning_scale=20.0, only_mid_control=True)
        expected = unet(**unet_inputs(inp), down_block_additional_residuals=[torch.zeros_like(d) for d in down],
                        mid_block_additional_residual=mid).sample
        full = net(**inp, conditioning_scale=20.0)
        bare = unet(**unet_inputs(inp)).sample
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert (out - full).abs().max() > 1e-3 and (out - bare).abs().max() > 1e-3
