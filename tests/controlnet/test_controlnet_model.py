"""ControlNet model tests (Zhang, Rao & Agrawala 2023): structure, zero init, diffusers parity, validation."""
import pytest
import torch
from diffusers import ControlNetModel

from controlnet import ControlledUNet, ControlNet, ControlNetConfig, HintEncoder

from .tiny import CONFIGS, assert_residuals_close, make_inputs, make_unet, randomize, unet_inputs

NAMES = list(CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_matches_diffusers(name):
    unet = make_unet(name)
    ours, ref = ControlNet.from_unet(unet).state_dict(), ControlNetModel.from_unet(unet).state_dict()
    assert set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_diffusers(name):
    unet = make_unet(name)
    def public(config):  # the constructor arguments, sequences as lists (as in config.json)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert public(ControlNet.from_unet(unet).config) == public(ControlNetModel.from_unet(unet).config)


@pytest.mark.parametrize("name", NAMES)
def test_from_unet_copies_encoder_and_zero_inits_new_layers(name):
    unet = make_unet(name)
    cn = ControlNet.from_unet(unet)
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        mine, theirs = getattr(cn, part).state_dict(), getattr(unet, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert getattr(cn, part) is not getattr(unet, part)
    if name == "sdxl":
        assert torch.equal(cn.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)
    zero = list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    assert all(float(p.detach().abs().sum()) == 0 for m in zero for p in m.parameters())
    # Copy is independent: training the ControlNet does not touch the UNet.
    with torch.no_grad():
        cn.conv_in.weight.add_(1.0)
    assert not torch.equal(cn.conv_in.weight, unet.conv_in.weight)


@pytest.mark.parametrize("name", NAMES)
def test_one_zero_conv_per_unet_skip(name):
    unet = make_unet(name)
    cn = ControlNet.from_unet(unet)
    inp = make_inputs(name)
    with torch.no_grad():
        down, mid = cn(**inp)
    # Count and channels of the UNet's down_block_res_samples, collected with a hook on its blocks.
    skips = []
    h = unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o))
    hs = [b.register_forward_hook(lambda m, i, o: skips.extend(o[1])) for b in unet.down_blocks]
    with torch.no_grad():
        unet(**unet_inputs(inp))
    for x in [h, *hs]:
        x.remove()
    assert len(cn.controlnet_down_blocks) == len(skips) == len(down)
    assert [d.shape for d in down] == [s.shape for s in skips]
    assert cn.controlnet_mid_block.in_channels == unet.config.block_out_channels[-1] == mid.shape[1]


def test_hint_encoder_widths_and_downscale():
    enc = HintEncoder(3, 32)
    convs = [enc.conv_in, *enc.blocks, enc.conv_out]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 16), (16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256), (256, 32)]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert enc(torch.rand(1, 3, 64, 48)).shape == (1, 32, 8, 6)
    with torch.no_grad():
        assert float(enc(torch.rand(1, 3, 64, 64)).abs().max()) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_controlled_unet_equals_bare_unet(name):
    unet = make_unet(name)
    net = ControlledUNet(unet, ControlNet.from_unet(unet))
    inp = make_inputs(name)
    with torch.no_grad():
        ref = unet(**unet_inputs(inp)).sample
        out = net(**inp, conditioning_scale=1.7)
        out_guess = net(**inp, guess_mode=True)
    assert torch.equal(out, ref) and torch.equal(out_guess, ref)


@pytest.mark.parametrize("extra", [
    dict(class_embed_type="timestep"), dict(num_class_embeds=10), dict(encoder_hid_dim=48),
    dict(addition_embed_type="text", addition_embed_type_num_heads=4), dict(mid_block_type="UNetMidBlock2D"),
    dict(resnet_time_scale_shift="scale_shift", only_cross_attention=True, upcast_attention=True)])
def test_zero_init_other_unet_options(extra):
    """Options beyond SD/SDXL (some of which diffusers' ControlNetModel mishandles) still copy exactly."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = randomize(UNet2DConditionModel(**{**CONFIGS["sd15"], **extra}).eval())
    net = ControlledUNet(unet, ControlNet.from_unet(unet))
    inp = make_inputs("sd15")
    if "encoder_hid_dim" in extra:
        inp["encoder_hidden_states"] = torch.randn(2, 5, 48)
    kw = {"class_labels": torch.tensor([3, 7])} if "class" in str(extra) else {}
    with torch.no_grad():
        assert torch.equal(net(**inp, **kw), unet(**unet_inputs(inp), **kw).sample)
    randomize(net.controlnet, seed=1)
    with torch.no_grad():
        assert not torch.equal(net(**inp, **kw), unet(**unet_inputs(inp), **kw).sample)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("guess_mode,scale", [(False, 1.0), (False, 0.6), (True, 0.8)])
def test_residuals_match_diffusers_controlnet(name, guess_mode, scale):
    unet = make_unet(name)
    ref = randomize(ControlNetModel.from_unet(unet), seed=3)  # zero convs random too: the test can fail
    ours = ControlNet.from_unet(unet)
    ours.load_state_dict(ref.state_dict())
    inp = make_inputs(name)
    with torch.no_grad():
        a = ours(**inp, conditioning_scale=scale, guess_mode=guess_mode)
        b = ref(**inp, conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
    assert float(a[1].abs().max()) > 1e-3  # non-trivial residuals
    assert_residuals_close(a, b)


def test_guess_mode_scales_are_logspace():
    unet = make_unet("sd15")
    cn = randomize(ControlNet.from_unet(unet), seed=5)
    inp = make_inputs("sd15")
    with torch.no_grad():
        (d0, m0), (d1, m1) = cn(**inp), cn(**inp, guess_mode=True)
    scales = torch.logspace(-1, 0, len(d0) + 1)
    for x, y, s in zip(d0, d1, scales):
        torch.testing.assert_close(y, x * s)
    torch.testing.assert_close(m1, m0)  # deepest scale is 1.0
    assert abs(float(scales[0]) - 0.1) < 1e-7


def test_bgr_channel_order_and_class_labels_config():
    unet = make_unet("sd15")
    ref = randomize(ControlNetModel.from_unet(unet, controlnet_conditioning_channel_order="bgr"), seed=2)
    ours = ControlNet.from_config(ref.config)
    ours.load_state_dict(ref.state_dict())
    inp = make_inputs("sd15")
    with torch.no_grad():
        assert_residuals_close(ours(**inp), ref(**inp, return_dict=False))


def test_condition_size_and_channel_errors():
    unet = make_unet("sd15")
    cn = ControlNet.from_unet(unet)
    inp = make_inputs("sd15", latent=8)
    with pytest.raises(ValueError, match=r"expected \(64, 64\)"):
        cn(**{**inp, "controlnet_cond": torch.rand(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="3 channels"):
        cn(**{**inp, "controlnet_cond": torch.rand(2, 1, 64, 64)})
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        cn(**{**inp, "sample": torch.rand(2, 3, 8, 8)})
    with pytest.raises(ValueError, match="batch"):
        cn(**{**inp, "controlnet_cond": torch.rand(3, 3, 64, 64)})
    with pytest.raises(ValueError, match="32 features"):
        cn(**{**inp, "encoder_hidden_states": torch.rand(2, 5, 16)})
    with pytest.warns(UserWarning, match="resizing"), torch.no_grad():
        down, _ = cn(**{**inp, "controlnet_cond": torch.rand(2, 3, 40, 72)}, resize_condition=True)
    assert down[0].shape == (2, 32, 8, 8)
    with torch.no_grad():  # a single condition broadcasts over the batch
        cn(**{**inp, "controlnet_cond": torch.rand(1, 3, 64, 64)})


def test_sdxl_requires_added_cond_kwargs():
    unet = make_unet("sdxl")
    cn = ControlNet.from_unet(unet)
    inp = make_inputs("sdxl")
    inp["added_cond_kwargs"] = {"text_embeds": inp["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(ValueError, match="time_ids"):
        cn(**inp)


def test_unsupported_unet_option_is_named():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**{**CONFIGS["sd15"], "time_cond_proj_dim": 8})
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        ControlNet.from_unet(unet)


def test_config_roundtrip_and_custom_hint_widths():
    cfg = ControlNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                           conditioning_embedding_out_channels=(8, 16), conditioning_channels=1)
    assert ControlNetConfig.from_dict(cfg.to_dict()) == cfg
    cn = ControlNet.from_config(cfg)
    assert cfg.hint_downscale == 2
    down, _ = cn(torch.randn(1, 4, 8, 8), 3, torch.randn(1, 5, 32), torch.rand(1, 1, 16, 16))
    assert down[0].shape == (1, 32, 8, 8)
