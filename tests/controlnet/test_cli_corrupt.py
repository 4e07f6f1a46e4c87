"""cn-sample's exit-2 contract on corrupt model directories: every file of a tiny SD pipeline + ControlNet, broken
each way (missing, zero bytes, truncated, random bytes, a wrong value, another file's weights), fails with exit
status 2 and a `cn-sample: error:` line naming the file, before any weights load and without a traceback."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from controlnet.cli import main

from .sd_fixtures import tiny_sd

BAD_VALUES = {  # a string where the loader needs a number
    "base/unet/config.json": ("layers_per_block", "two"),
    "base/vae/config.json": ("latent_channels", "four"),
    "base/text_encoder/config.json": ("hidden_size", "wide"),
    "base/scheduler/scheduler_config.json": ("num_train_timesteps", "many"),
    "base/tokenizer/tokenizer_config.json": ("model_max_length", "long"),
    "base/tokenizer/vocab.json": ("a", "first"),
    "controlnet/config.json": ("conditioning_channels", "three"),
}
OTHER_WEIGHTS = {  # a valid safetensors file of another component
    "base/unet/diffusion_pytorch_model.safetensors": "base/vae/diffusion_pytorch_model.safetensors",
    "base/vae/diffusion_pytorch_model.safetensors": "base/unet/diffusion_pytorch_model.safetensors",
    "base/text_encoder/model.safetensors": "base/vae/diffusion_pytorch_model.safetensors",
    "controlnet/diffusion_pytorch_model.safetensors": "base/vae/diffusion_pytorch_model.safetensors",
}
FILES = ["base/unet/config.json", "base/unet/diffusion_pytorch_model.safetensors", "base/vae/config.json",
         "base/vae/diffusion_pytorch_model.safetensors", "base/text_encoder/config.json",
         "base/text_encoder/model.safetensors", "base/scheduler/scheduler_config.json",
         "base/tokenizer/vocab.json", "base/tokenizer/merges.txt", "base/tokenizer/tokenizer_config.json",
         "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors"]
MODES = ["missing", "zero_bytes", "truncated", "random_bytes"]
CASES = ([(f, m) for f in FILES for m in MODES] + [(f, "bad_value") for f in BAD_VALUES]
         + [(f, "other_weights") for f in OTHER_WEIGHTS])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny SD1.5-layout pipeline and a ControlNet made for it, plus an edge-map condition."""
    import torch
    from diffusers import UNet2DConditionModel

    from controlnet import ControlNet

    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(tiny_sd(), root / "base")
    torch.manual_seed(0)
    ControlNet.from_unet(UNet2DConditionModel.from_pretrained(root / "base" / "unet")).save_pretrained(
        root / "controlnet")
    cond = np.zeros((32, 32, 3), np.uint8)
    cond[8:24, 8] = cond[8:24, 23] = cond[8, 8:24] = cond[23, 8:24] = 255
    Image.fromarray(cond).save(root / "cond.png")
    return root


def corrupt(path, mode, root):
    data = path.read_bytes()
    if mode == "missing":
        path.unlink()
    elif mode == "zero_bytes":
        path.write_bytes(b"")
    elif mode == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif mode == "bad_value":
        key, value = BAD_VALUES[path.relative_to(root).as_posix()]
        path.write_text(json.dumps({**json.loads(data), key: value}))
    elif mode == "other_weights":
        shutil.copyfile(root / OTHER_WEIGHTS[path.relative_to(root).as_posix()], path)


def run_cli(root, out, *extra):
    return main(["--condition", str(root / "cond.png"), "--prompt", "red circle", "--model", str(root / "base"),
                 "--controlnet", str(root / "controlnet"), "--num_images", "1", "--steps", "1", "--no_progress",
                 "--out", str(out), *extra])


def test_pristine_fixture_samples(pristine, tmp_path):
    assert run_cli(pristine, tmp_path / "out") == 0
    assert (tmp_path / "out" / "sample_00.png").is_file()


@pytest.mark.parametrize("rel,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_corrupt_file_exits_2_naming_it(pristine, tmp_path, capsys, rel, mode):
    root = tmp_path / "m"
    shutil.copytree(pristine, root)
    corrupt(root / rel, mode, root)
    with pytest.raises(SystemExit) as e:
        run_cli(root, tmp_path / "out")
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("cn-sample: error: ") and "Traceback" not in err, err
    assert str(root / rel) in err, err  # names the file
    assert not (tmp_path / "out").exists()


def _rename_weights(path, fn):
    from safetensors.torch import load_file, save_file

    save_file({fn(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def test_layouts_the_loaders_convert_pass_the_checks(pristine, tmp_path):
    """Older files that diffusers / transformers still load are not refused: a text encoder whose names carry
    `text_model.` and a VAE with the old attention names (query / key / value / proj_attn); files the loaders do
    not read (model_index.json, special_tokens_map.json) may be missing."""
    root = tmp_path / "m"
    shutil.copytree(pristine, root)
    (root / "base/model_index.json").unlink()
    (root / "base/tokenizer/special_tokens_map.json").unlink()
    _rename_weights(root / "base/text_encoder/model.safetensors", lambda k: "text_model." + k)
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(k):
        for a, b in old.items():
            k = k.replace(a, b)
        return k
    _rename_weights(root / "base/vae/diffusion_pytorch_model.safetensors", rename)
    assert run_cli(root, tmp_path / "out") == 0

