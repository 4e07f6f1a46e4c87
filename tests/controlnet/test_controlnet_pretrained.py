"""ControlNet is a diffusers ModelMixin + ConfigMixin whose config and weights are diffusers' ControlNetModel's
(Zhang, Rao & Agrawala 2023): save_pretrained / from_pretrained both ways with identical residuals, strict loading,
and a trained run's ControlNet back in one call."""
import json

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ControlNetModel, ModelMixin
from PIL import Image
from safetensors.torch import load_file, save_file

from controlnet import ControlNet
from controlnet.pipeline import ControlNetPipeline
from controlnet.training import build_dataset, train, validation_grid, validation_pairs

from .sd_fixtures import REPO, tiny_sd
from .test_train_controlnet import PROMPT, make_cfg
from .tiny import CONFIGS, make_inputs, make_unet, randomize

DEFAULT_CONTROLNET = REPO / "models" / "default" / "controlnet"


def public(config) -> dict:
    """Constructor arguments of a config (no `_` keys), sequences as lists as in config.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def assert_identical(a, b):
    (da, ma), (db, mb) = a, b
    assert len(da) == len(db) and all(torch.equal(x, y) for x, y in zip(da, db)) and torch.equal(ma, mb)


def test_controlnet_is_a_diffusers_model():
    cn = ControlNet.from_unet(make_unet("sd15"))
    assert isinstance(cn, ModelMixin) and isinstance(cn, ConfigMixin)
    assert public(cn.config) == public(ControlNetModel.from_unet(make_unet("sd15")).config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_is_a_controlnetmodel_directory(name, tmp_path):
    """Our directory: config.json (ControlNetModel, its keys) + safetensors; diffusers and we read it identically."""
    ours = randomize(ControlNet.from_unet(make_unet(name)), seed=3).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel" and public(cfg) == public(ours.config)
    assert load_file(tmp_path / "diffusion_pytorch_model.safetensors").keys() == ours.state_dict().keys()
    theirs, again = ControlNetModel.from_pretrained(tmp_path).eval(), ControlNet.from_pretrained(tmp_path).eval()
    assert public(theirs.config) == public(ours.config) == public(again.config)
    inp = make_inputs(name)
    with torch.no_grad():
        ref = ours(**inp)
        assert_identical(again(**inp), ref)
        assert_identical(theirs(**inp, return_dict=False), ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_directory_loads_with_identical_residuals(name, tmp_path):
    theirs = randomize(ControlNetModel.from_unet(make_unet(name)), seed=4).eval()
    theirs.save_pretrained(tmp_path)
    ours = ControlNet.from_pretrained(tmp_path).eval()
    assert isinstance(ours, ControlNet)
    inp = make_inputs(name)
    with torch.no_grad():
        assert_identical(ours(**inp), theirs(**inp, return_dict=False))
    ours.save_pretrained(tmp_path / "back")  # and back into diffusers
    back = ControlNetModel.from_pretrained(tmp_path / "back").eval()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), theirs.state_dict().values()))


def test_shipped_default_controlnet_loads_unchanged():
    ours, theirs = ControlNet.from_pretrained(DEFAULT_CONTROLNET), ControlNetModel.from_pretrained(DEFAULT_CONTROLNET)
    file = load_file(DEFAULT_CONTROLNET / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in file.items())
    assert public(ours.config) == public(json.loads((DEFAULT_CONTROLNET / "config.json").read_text()))
    assert public(theirs.config) == public(ours.config)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    """diffusers would re-initialise missing tensors (a warning) or fail without naming the file: we name both."""
    ControlNet.from_unet(make_unet("sd15")).save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    save_file({**sd, "conv_in.weight": torch.zeros(3, 3)}, f)
    with pytest.raises(RuntimeError, match=r"(?s)diffusion_pytorch_model\.safetensors does not match the ControlNet.*"
                                           r"shape mismatches: conv_in\.weight: checkpoint \(3, 3\)"):
        ControlNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="describes a UNet2DConditionModel, not a ControlNet"):
        ControlNet.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        ControlNet.from_pretrained(tmp_path / "nowhere")


def test_old_positional_config_gets_a_clear_error():
    with pytest.raises(TypeError, match=r"ControlNet\.from_config"):
        ControlNet(dict(in_channels=4))


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("use_ema", [False, True])
def test_trained_run_loads_in_one_call_and_reproduces_its_validation(use_ema, tmp_path):
    """A short real run: ControlNet.from_pretrained(output_dir) (and checkpoint-N/controlnet) is the trained net,
    output_dir/controlnet_ema (and checkpoint-N/controlnet_ema) the EMA with --use_ema, and the loaded net that
    drew the validation grid (the EMA with --use_ema) redraws it bit for bit."""
    cfg = make_cfg(tmp_path / "run", max_train_steps=2, validation_prompt=[PROMPT], num_validation_images=1,
                   validation_steps=2, validation_inference_steps=2, sampler="euler", train_batch_size=4,
                   use_ema=use_ema, ema_decay=0.5)
    result = train(cfg)
    out = tmp_path / "run"
    nets = {out: result["controlnet"], out / "checkpoint-00000002" / "controlnet": result["controlnet"]}
    if use_ema:
        nets.update({out / "controlnet_ema": result["ema"],
                     out / "checkpoint-00000002" / "controlnet_ema": result["ema"]})
        assert not all(torch.equal(a, b) for a, b in zip(result["ema"].state_dict().values(),
                                                         result["controlnet"].state_dict().values()))
    else:
        assert result["ema"] is None and not (out / "controlnet_ema").exists()
    for d, trained in nets.items():
        loaded = ControlNet.from_pretrained(d)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    pipe = ControlNetPipeline.from_pretrained(tiny_sd(), controlnet=str(out / "controlnet_ema" if use_ema else out))
    redrawn = validation_grid(pipe, cfg, validation_pairs(cfg, build_dataset(cfg)))
    assert np.array_equal(redrawn, np.asarray(Image.open(out / "validation" / "step-2.png")))
