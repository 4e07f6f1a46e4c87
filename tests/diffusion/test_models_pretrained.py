"""DiT, MMDiT and DiTControlNet are diffusers ModelMixin + ConfigMixin (register_to_config): save_pretrained writes
config.json + safetensors, from_pretrained rebuilds the network in one call with identical outputs; loading is
local, strict and pickle-free (diffusion/models/pretrained.py)."""
import json

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from safetensors.torch import load_file, save_file

from controlnet import DiTControlNet
from diffusion.models import DiT, MMDiT, build_dit, build_mmdit, load_pretrained

FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def randomized(model, seed=0):
    """Random values everywhere (adaLN-Zero and zero-init heads included) so a lost tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(kind, b=2, c=4, s=16):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(b, c, s, s, generator=g), torch.rand(b, generator=g) * 1000
    if kind.startswith("mmdit"):
        return (x, t), dict(encoder_hidden_states=torch.randn(b, 5, 24, generator=g),
                            pooled_projections=torch.randn(b, 12, generator=g))
    return (x, t), dict(y=torch.tensor([3, 10]))


def build(kind):
    torch.manual_seed(0)
    if kind == "dit":
        return build_dit("DiT-Tiny/2", input_size=16, num_classes=10)
    if kind == "dit_learn_sigma":
        return build_dit("DiT-Tiny/4", input_size=16, num_classes=10, learn_sigma=True, qk_norm=True)
    if kind == "mmdit":
        return build_mmdit("MMDiT-Tiny", input_size=16, joint_attention_dim=24, pooled_projection_dim=12)
    base = build("dit" if kind == "dit_controlnet" else "mmdit")
    return DiTControlNet.from_transformer(base, num_layers=1, conditioning_channels=3)


def run(model, kind):
    args, kw = inputs(kind)
    with torch.no_grad():
        if kind.endswith("controlnet"):
            cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
            return torch.stack(model(*args, cond, **kw))
        return model(*args, **kw)


KINDS = ["dit", "dit_learn_sigma", "mmdit", "dit_controlnet", "mmdit_controlnet"]
CLASSES = {"dit": DiT, "dit_learn_sigma": DiT, "mmdit": MMDiT, "dit_controlnet": DiTControlNet,
           "mmdit_controlnet": DiTControlNet}


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_pretrained_round_trip(kind, tmp_path):
    model = randomized(build(kind))
    cls = CLASSES[kind]
    assert isinstance(model, ModelMixin) and isinstance(model, ConfigMixin)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES  # safetensors only, no pickle
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == cls.__name__
    assert load_file(tmp_path / FILES[1]).keys() == model.state_dict().keys()
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert torch.equal(run(loaded.eval(), kind), run(model, kind))
    assert torch.equal(run(load_pretrained(tmp_path).eval(), kind), run(model, kind))  # class from config.json


def test_config_json_holds_the_constructor_arguments(tmp_path):
    build("dit").save_pretrained(tmp_path / "dit")
    cfg = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert {k: cfg[k] for k in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels",
                                "num_classes", "learn_sigma", "qk_norm")} == dict(
        depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=16, in_channels=4, num_classes=10,
        learn_sigma=False, qk_norm=False)
    build("mmdit").save_pretrained(tmp_path / "mmdit")
    cfg = json.loads((tmp_path / "mmdit" / "config.json").read_text())
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["out_channels"]) == (2, 128, 2, 4)  # resolved
    assert (cfg["joint_attention_dim"], cfg["pooled_projection_dim"]) == (24, 12)
    build("mmdit_controlnet").save_pretrained(tmp_path / "cn")
    cfg = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert (cfg["arch"], cfg["num_layers"], cfg["hidden_size"], cfg["conditioning_channels"]) == ("mmdit", 1, 128, 3)
    loaded = DiTControlNet.from_pretrained(tmp_path / "cn")
    public = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
    assert {k: v for k, v in DiTControlNet(**public).config.items() if not k.startswith("_")} == public


def test_load_options_dtype_and_subfolder(tmp_path):
    model = randomized(build("dit"))
    model.save_pretrained(tmp_path / "run" / "transformer_ema")
    loaded = DiT.from_pretrained(tmp_path / "run", subfolder="transformer_ema", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(loaded.state_dict().values(),
                                                                     model.state_dict().values()))


def test_sharded_variant_directory(tmp_path):
    model = randomized(build("mmdit"))
    model.save_pretrained(tmp_path, variant="fp16", max_shard_size="200KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert torch.equal(run(MMDiT.from_pretrained(tmp_path, variant="fp16").eval(), "mmdit"), run(model, "mmdit"))


def test_wrong_class_missing_dir_and_unfitting_weights_are_named(tmp_path):
    build("dit").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="describes a DiT, not a MMDiT: load it with DiT"):
        MMDiT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nowhere/config\.json not found"):
        DiT.from_pretrained(tmp_path / "nowhere")
    f = tmp_path / FILES[1]
    sd = load_file(f)
    extra = {**{k: v for k, v in sd.items() if k != "final_layer.linear.bias"}, "extra.weight": torch.zeros(1),
             "x_embedder.weight": torch.zeros(1, 1)}
    save_file(extra, f)
    with pytest.raises(RuntimeError, match=r"(?s)safetensors does not match the DiT state dict:.*"
                                           r"missing keys: final_layer\.linear\.bias.*unexpected keys: extra\.weight.*"
                                           r"shape mismatches: x_embedder\.weight"):
        DiT.from_pretrained(tmp_path)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors in"):
        DiT.from_pretrained(tmp_path)


def test_pickle_weights_need_opt_in(tmp_path):
    model = randomized(build("dit"))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"refusing to unpickle .*diffusion_pytorch_model\.bin.*allow_pickle=True"):
        DiT.from_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path, allow_pickle=True)
    assert torch.equal(run(loaded.eval(), "dit"), run(model, "dit"))


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_trained_run_loads_in_one_call_and_redraws_its_validation_grid(backbone, tmp_path):
    """A short real RF run: output_dir/transformer and transformer_ema are the final and EMA nets (one
    from_pretrained call each), and the loaded EMA net redraws the trainer's validation grid bit for bit."""
    import numpy as np
    from accelerate.state import AcceleratorState
    from PIL import Image

    from diffusion.training import rf_dit
    from diffusion.training.grids import make_grid
    from diffusion.training.rf_sampling import grid_conditions, sample_images

    AcceleratorState._reset_state(True)  # several Accelerators in one process
    out = tmp_path / "run"
    kw = dict(output_dir=str(out), model="DiT-Tiny/4", train_batch_size=8, max_train_steps=3, progress_bar=False,
              report_to="none", validation_steps=0, samples_per_class=1, validation_inference_steps=2,
              lr_warmup_steps=0,
              checkpointing_steps=1000, learning_rate=1e-3, ema_decay=0.5)
    if backbone == "mmdit":
        kw.update(backbone="mmdit", model="MMDiT-Tiny", dataset="shapes", num_shapes=64, text_hidden_size=32)
    result = rf_dit.train(rf_dit.TrainConfig(**kw))
    cls = DiT if backbone == "dit" else MMDiT
    for name, trained in (("transformer", result["model"]), ("transformer_ema", result["ema"])):
        loaded = cls.from_pretrained(out / name)
        assert sorted(p.name for p in (out / name).iterdir()) == FILES
        assert loaded.state_dict().keys() == trained.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(result["model"].state_dict().values(),
                                                     result["ema"].state_dict().values()))  # two different nets

    ema = load_pretrained(out / "transformer_ema").eval()  # the class comes from config.json
    _, cfg, extra = rf_dit.load_trained(out)  # conditioner, codec, shapes: the run's own
    grid, nrow = grid_conditions(cfg, extra["conditioner"].num_classes, extra["names"], extra["texts"])
    imgs = sample_images(ema, cfg, extra["conditioner"], extra["codec"], extra["x_shape"], labels=grid.get("labels"),
                         texts=grid.get("texts"), seed=cfg.sample_seed, num=grid.get("num", 1))
    assert np.array_equal(make_grid(imgs, nrow), np.asarray(Image.open(out / "validation" / "step-3.png")))
