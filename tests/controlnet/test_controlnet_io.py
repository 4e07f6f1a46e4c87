"""ControlNet weights I/O (Zhang, Rao & Agrawala 2023): diffusers directories, original layout, pickle policy."""
import json

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from controlnet import ControlNet, ControlNetConfig, diffusers_to_original, original_to_diffusers

from .tiny import CONFIGS, assert_residuals_close, make_inputs, make_unet, randomize


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_save_loads_into_ours(name, tmp_path):
    unet = make_unet(name)
    ref = randomize(ControlNetModel.from_unet(unet), seed=11)
    ref.save_pretrained(tmp_path)
    ours = ControlNet.from_pretrained(tmp_path)
    inp = make_inputs(name)
    with torch.no_grad():
        assert_residuals_close(ours(**inp), ref(**inp, return_dict=False))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_save_loads_in_diffusers(name, tmp_path):
    unet = make_unet(name)
    ours = randomize(ControlNet.from_unet(unet), seed=12)
    ours.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "ControlNetModel"
    ref = ControlNetModel.from_pretrained(tmp_path)
    inp = make_inputs(name)
    with torch.no_grad():
        assert_residuals_close(ours(**inp), ref(**inp, return_dict=False))
    again = ControlNet.from_pretrained(tmp_path)  # and our own round trip
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_pickle_refused_unless_opted_in(tmp_path):
    cn = randomize(ControlNet.from_unet(make_unet("sd15")), seed=1)
    for suffix in (".ckpt", ".pth", ".bin", ".pt"):
        path = tmp_path / f"weights{suffix}"
        torch.save({"state_dict": cn.state_dict()}, path)
        with pytest.raises(ValueError, match=rf"weights\{suffix}.*allow_pickle=True"):
            ControlNet.from_single_file(path, unet=make_unet("sd15"))
    loaded = ControlNet.from_single_file(tmp_path / "weights.pt", unet=make_unet("sd15"), allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cn.state_dict().values()))


def test_pickle_directory_needs_opt_in(tmp_path):
    ref = ControlNetModel.from_unet(make_unet("sd15"))
    ref.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="allow_pickle"):
        ControlNet.from_pretrained(tmp_path)
    ControlNet.from_pretrained(tmp_path, allow_pickle=True)


def test_mismatched_checkpoint_names_keys_and_file(tmp_path):
    cn = ControlNet.from_unet(make_unet("sd15"))
    sd = dict(cn.state_dict())
    sd["bogus.weight"] = torch.zeros(1)
    del sd["controlnet_mid_block.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(RuntimeError) as err:
        cn.load_weights(path)
    msg = str(err.value)
    assert "bad.safetensors" in msg and "controlnet_mid_block.weight" in msg and "bogus.weight" in msg
    sd = {k: v for k, v in cn.state_dict().items()}
    sd["conv_in.weight"] = torch.zeros(3, 3)
    save_file(sd, str(path))
    with pytest.raises(RuntimeError, match="shape mismatches: conv_in.weight"):
        cn.load_weights(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        cn.load_weights(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_layout_roundtrip(name, tmp_path):
    unet = make_unet(name)
    ours = randomize(ControlNet.from_unet(unet), seed=7)
    orig = diffusers_to_original(ours.state_dict(), ours.config)
    assert all(k.startswith("control_model.") for k in orig)
    assert "control_model.input_hint_block.14.weight" in orig and "control_model.middle_block_out.0.weight" in orig
    # Bundled SD weights next to control_model.* are ignored.
    save_file({**{k: v.contiguous() for k, v in orig.items()}, "model.diffusion_model.out.0.weight": torch.ones(2)},
              str(tmp_path / "control_tiny.safetensors"))
    loaded = ControlNet.from_single_file(tmp_path / "control_tiny.safetensors", unet=unet)
    inp = make_inputs(name)
    with torch.no_grad():
        assert_residuals_close(loaded(**inp), ours(**inp), atol=0)


def test_original_layout_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    cfg = ControlNetConfig(**{k: v for k, v in CONFIGS["sd15"].items()
                              if k in ("block_out_channels", "layers_per_block", "down_block_types",
                                       "cross_attention_dim", "attention_head_dim", "norm_num_groups")})
    cn = randomize(ControlNet.from_config(cfg), seed=9)
    orig = diffusers_to_original(cn.state_dict(), cfg)
    theirs = convert_controlnet_checkpoint(orig, {"layers_per_block": cfg.layers_per_block})
    mine = original_to_diffusers(orig, cfg)
    assert set(theirs) == set(mine) == set(cn.state_dict())
    assert all(theirs[k] is mine[k] for k in mine)


def test_original_names_and_shapes_for_real_sd15_layout():
    """Names/shapes of lllyasviel's control_sd15_*.pth / control_v11*_sd15_* checkpoints (SD1.5 config)."""
    with torch.device("meta"):
        cn = ControlNet.from_config(ControlNetConfig(cross_attention_dim=768))  # full SD1.5 ControlNet, no memory
    orig = {k: tuple(v.shape) for k, v in diffusers_to_original(cn.state_dict(), cn.config).items()}
    known = {
        "control_model.time_embed.0.weight": (1280, 320),
        "control_model.time_embed.2.weight": (1280, 1280),
        "control_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "control_model.input_hint_block.0.weight": (16, 3, 3, 3),
        "control_model.input_hint_block.2.weight": (16, 16, 3, 3),
        "control_model.input_hint_block.4.weight": (32, 16, 3, 3),
        "control_model.input_hint_block.6.weight": (32, 32, 3, 3),
        "control_model.input_hint_block.8.weight": (96, 32, 3, 3),
        "control_model.input_hint_block.10.weight": (96, 96, 3, 3),
        "control_model.input_hint_block.12.weight": (256, 96, 3, 3),
        "control_model.input_hint_block.14.weight": (320, 256, 3, 3),
        "control_model.input_blocks.1.0.in_layers.0.weight": (320,),
        "control_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "control_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "control_model.input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "control_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "control_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "control_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "control_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "control_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "control_model.middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "control_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "control_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "control_model.middle_block_out.0.weight": (1280, 1280, 1, 1),
    }
    for i in range(12):  # zero_convs.i.0 follows input_blocks.i: 4x320, 3x640, 5x1280
        ch = 320 if i < 4 else 640 if i < 7 else 1280
        known[f"control_model.zero_convs.{i}.0.weight"] = (ch, ch, 1, 1)
        known[f"control_model.zero_convs.{i}.0.bias"] = (ch,)
    for k, shape in known.items():
        assert orig.get(k) == shape, k
    assert "control_model.zero_convs.12.0.weight" not in orig
    assert len(orig) == len(cn.state_dict())
    # SD2 ldm checkpoints use linear proj_in/out; SD1.5 1x1 convs: the loader reshapes between the two.


def test_original_layout_conv_proj_into_linear_config(tmp_path):
    unet = make_unet("sd2")  # use_linear_projection=True
    ours = randomize(ControlNet.from_unet(unet), seed=4)
    orig = {k: (v[..., None, None] if k.endswith(("proj_in.weight", "proj_out.weight")) else v).contiguous()
            for k, v in diffusers_to_original(ours.state_dict(), ours.config).items()}
    save_file(orig, str(tmp_path / "c.safetensors"))
    loaded = ControlNet.from_single_file(tmp_path / "c.safetensors", unet=unet)
    assert torch.equal(loaded.down_blocks[0].attentions[0].proj_in.weight, ours.down_blocks[0].attentions[0].proj_in.weight)
