"""Bad-input suite: every bad input gets a clear error naming the problem (and the fix) with nothing on disk
changed, or a documented repair (docs/RELIABILITY.md). Two tables: ERRORS (setup -> failing call, expected
message, what must stay unchanged) and REPAIRS (image kind -> the pixels every loader must produce)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlNet
from controlnet import cli
from controlnet.data import ControlNetDataset
from controlnet.pipeline import ControlNetPipeline
from controlnet.training import TrainControlNetConfig, train as train_cn
from diffusion import classifier_free_guidance, get_schedule, get_timesteps, sample, wrap_model
from diffusion.training.checkpoint import load_weights
from diffusion.training.config import ConfigError, parse_config
from diffusion.training.data import ImageFolderDataset
from diffusion.prediction import check_prediction

from .common import RF, T2I, Exit2, argv_of, cn_cfg, exit2, fill_data, rf_cfg, snapshot, t2i_cfg, tiny_sd

RGB = (200, 40, 90)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_images(folder: Path, n: int = 4, size=(16, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 40 * i + 20, np.uint8)).save(folder / f"{i}.png")
    return folder


def corrupt_file(path: Path, kind: str) -> Path:
    """kind 'png': not an image at all; 'jpeg': a real JPEG cut in half."""
    if kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    else:
        buf = path.with_suffix(".tmp.jpg")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buf, quality=90)
        data = buf.read_bytes()
        buf.unlink()
        path.write_bytes(data[: len(data) // 2])
    return path


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Finished tiny runs to copy: an RF run on an image folder and a ControlNet run on 6 fill samples."""
    root = tmp_path_factory.mktemp("base")
    _reset_accelerate()
    folder = write_images(root / "rf_images")
    RF.train(rf_cfg(root / "rf_run", dataset="folder", data_dir=str(folder), train_batch_size=4, max_train_steps=1,
                    checkpointing_steps=1))
    _reset_accelerate()
    data = root / "cn_data"
    shutil.copytree(fill_data(), data)
    (data / "prompt.json").write_text("\n".join((data / "prompt.json").read_text().splitlines()[:6]) + "\n")
    train_cn(cn_cfg(root / "cn_run", train_data_dir=str(data), max_train_steps=1, checkpointing_steps=1))
    _reset_accelerate()
    return root


@pytest.fixture(scope="module")
def pipe(base):
    p = ControlNetPipeline.from_pretrained(tiny_sd(), controlnet=str(base / "cn_run"))
    return p


class Ctx:
    """Per-case scratch space (copies of the base runs and their data) inside tmp."""

    def __init__(self, tmp: Path, base: Path, pipe):
        self.tmp, self.base, self.pipe = tmp, base, pipe

    def copy(self, name: str) -> Path:
        dst = self.tmp / name
        if not dst.exists():
            shutil.copytree(self.base / name, dst)
        return dst

    def rf_resume(self, **kw):
        """RF config resuming the copied folder run (same model; data and overrides from kw). The copies' paths and
        the overrides differ from the run's config: allow_config_change lets the resume reach the input checked."""
        base = dict(dataset="folder", data_dir=str(self.copy("rf_images")), train_batch_size=4, max_train_steps=2,
                    checkpointing_steps=1, resume_from_checkpoint="latest", allow_config_change=True)
        return rf_cfg(self.copy("rf_run"), **{**base, **kw})

    def cn_resume(self, **kw):
        base = dict(train_data_dir=str(self.copy("cn_data")), max_train_steps=2, checkpointing_steps=1,
                    resume_from_checkpoint="latest", allow_config_change=True)
        return cn_cfg(self.copy("cn_run"), **{**base, **kw})


@pytest.fixture
def ctx(tmp_path, base, pipe):
    return Ctx(tmp_path, base, pipe)


# ----------------------------------------------------------------------------------------------- error table
ERRORS = []


def error(match: str, exc=ValueError, guard: str = "all"):
    """Register a case: fn(ctx) prepares inputs and returns the failing call. guard 'all': nothing under the
    case's tmp dir may change; 'checkpoints': the run's checkpoints may not (failures mid-training)."""
    def deco(fn):
        ERRORS.append(pytest.param(fn, exc, match, guard, id=fn.__name__))
        return fn
    return deco


def _in_training(trainer: str, kind: str):
    def fn(ctx):
        if trainer == "rf":
            corrupt_file(ctx.copy("rf_images") / "3.png", kind)
            cfg = ctx.rf_resume()
            return lambda: RF.train(cfg)
        rel = json.loads((ctx.copy("cn_data") / "prompt.json").read_text().splitlines()[0])["target"]
        corrupt_file(ctx.copy("cn_data") / rel, kind)
        cfg = ctx.cn_resume(train_batch_size=6)
        return lambda: train_cn(cfg)
    fn.__name__ = f"{trainer}_{kind}_corrupt_mid_training"
    return fn


error(r"cannot read image .*3\.png: (OSError|UnidentifiedImageError)", guard="checkpoints")(_in_training("rf", "png"))
error(r"cannot read image .*3\.png: OSError: image file is truncated", guard="checkpoints")(_in_training("rf", "jpeg"))
error(r"cannot read image .*target/0\.png.*--skip_bad_images", guard="checkpoints")(_in_training("cn", "png"))
error(r"cannot read image .*target/0\.png \(OSError: image file is truncated.*--skip_bad_images",
      guard="checkpoints")(_in_training("cn", "jpeg"))


@error(r"cannot read image .*DecompressionBombError")
def huge_image_decompression_bomb(ctx):
    folder = write_images(ctx.tmp / "imgs", n=1, size=(64, 64))

    def call():
        from PIL import Image as PILImage
        limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, 1000  # 64x64 > 2 x limit: refused
        try:
            ControlNetDataset([{"image": folder / "0.png", "conditioning_image": folder / "0.png", "text": ""}], 8)[0]
        finally:
            PILImage.MAX_IMAGE_PIXELS = limit
    return call


@error(r"--image .*0\.png: cannot read it as an image \(DecompressionBombError")
def cli_huge_image_decompression_bomb(ctx):
    folder = write_images(ctx.tmp / "imgs", n=1, size=(64, 64))

    def call():
        from PIL import Image as PILImage
        limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, 1000
        try:
            cli.run(["--image", str(folder / "0.png"), "--model", str(tiny_sd()), "--controlnet",
                     str(ctx.base / "cn_run"), "--out", str(ctx.tmp / "out")])
        finally:
            PILImage.MAX_IMAGE_PIXELS = limit
    return call


@error(r"condition tensors must lie in \[0, 1\].*divide 0-255 images by 255")
def condition_tensor_0_255(ctx):
    return lambda: ctx.pipe("a", torch.full((1, 3, 32, 32), 255.0), steps=1, output_type="latent")


@error(r"controlnet_cond must have 3 channels")
def condition_wrong_channels(ctx):
    return lambda: ctx.pipe("a", torch.zeros(1, 1, 32, 32), steps=1, output_type="latent")


@error(r"3 condition images for a batch of 2: give 1, one per prompt, or one per sample")
def condition_count_mismatch(ctx):
    return lambda: ctx.pipe(["a", "b"], [np.zeros((32, 32, 3), np.uint8)] * 3, steps=1, output_type="latent")


@error(r"height and width must be multiples of 8, got 30x32")
def pipeline_resolution_not_multiple_of_8(ctx):
    return lambda: ctx.pipe("a", np.zeros((32, 32, 3), np.uint8), height=30, steps=1, output_type="latent")


@error(r"resolution must be a multiple of 8 \(VAE factor\), got 30", exc=ConfigError)
def cn_resolution_not_multiple_of_8(ctx):
    return lambda: parse_config(TrainControlNetConfig, ["--pretrained_model_name_or_path", "x", "--train_data_dir",
                                                        "y", "--output_dir", str(ctx.tmp / "o"), "--resolution", "30"],
                                exit_on_error=False)


@error(r"resolution 15 is not a multiple of the patch size 4 of DiT-Tiny/4; use e\.g\. --resolution 16",
       exc=ConfigError)
def rf_resolution_not_multiple_of_patch(ctx):
    return lambda: parse_config(RF.TrainConfig, ["--model", "DiT-Tiny/4", "--resolution", "15",
                                                 "--output_dir", str(ctx.tmp / "o")], exit_on_error=False)


@error(r"no images \(.png.*\) found in .*empty")
def rf_empty_dataset(ctx):
    (ctx.tmp / "empty").mkdir()
    cfg = ctx.rf_resume(data_dir=str(ctx.tmp / "empty"))
    return lambda: RF.train(cfg)


@error(r"prompt\.json holds no records")
def cn_empty_dataset(ctx):
    (ctx.copy("cn_data") / "prompt.json").write_text("\n")
    cfg = ctx.cn_resume()
    return lambda: train_cn(cfg)


@error(r"dataset of 6 items is smaller than one global batch \(8 x 1 processes\); lower batch_size")
def cn_dataset_smaller_than_batch(ctx):
    cfg = ctx.cn_resume(train_batch_size=8)
    return lambda: train_cn(cfg)


@error(r"no caption column 'text'; columns: .* Set --caption_column")
def cn_missing_caption_column(ctx):
    d = ctx.copy("cn_data")
    (d / "prompt.json").unlink()
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "target/0.png", "conditioning_image": "source/0.png",
                                                  "prompt": "x"}) + "\n")
    cfg = ctx.cn_resume()
    return lambda: train_cn(cfg)


@error(r"no image column 'image' \(nor 'file_name'\).* Set --image_column")
def cn_missing_image_column(ctx):
    d = ctx.copy("cn_data")
    (d / "prompt.json").unlink()
    (d / "metadata.jsonl").write_text(json.dumps({"picture": "target/0.png", "text": "x"}) + "\n")
    cfg = ctx.cn_resume()
    return lambda: train_cn(cfg)


@error(r"prompt\.json:1: record lacks \['prompt'\]")
def cn_fill50k_missing_prompt(ctx):
    (ctx.copy("cn_data") / "prompt.json").write_text(json.dumps({"source": "source/0.png", "target": "target/0.png"}))
    cfg = ctx.cn_resume()
    return lambda: train_cn(cfg)


@error(r"metadata\.jsonl:1: each line needs a 'file_name' key")
def rf_metadata_missing_file_name(ctx):
    (ctx.copy("rf_images") / "metadata.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    cfg = ctx.rf_resume()
    return lambda: RF.train(cfg)


def _gauss_fn():
    s = get_schedule("vp_linear")
    return s, lambda x, t: (torch.zeros_like(x), x / s.prior_std())


@error(r"unknown sampler 'nope'; valid: \[.*'dpmpp_2m'")
def unknown_sampler(ctx):
    s, fn = _gauss_fn()
    return lambda: sample(fn, torch.zeros(1, 2), s, sampler="nope")


@error(r"unknown schedule 'nope'; valid: \[.*'rectified_flow'")
def unknown_schedule(ctx):
    return lambda: get_schedule("nope")


@error(r"unknown prediction kind 'nope'; valid: \['eps', 'x0', 'v', 'velocity', 'score'\]")
def unknown_prediction(ctx):
    return lambda: check_prediction("nope")


@error(r"unknown time grid 'nope'; valid: \[.*'trailing'")
def unknown_time_grid(ctx):
    return lambda: get_timesteps("nope", 4, get_schedule("cosine"))


@error(r"config key 'prediction'.*valid choices: \['velocity', 'eps', 'v', 'x0'\]", exc=ConfigError)
def rf_config_unknown_prediction(ctx):
    return lambda: parse_config(RF.TrainConfig, ["--prediction", "noise"], exit_on_error=False)


@error(r"unknown sampler 'nope'; valid", exc=ConfigError)
def cn_config_unknown_sampler(ctx):
    return lambda: parse_config(TrainControlNetConfig, ["--pretrained_model_name_or_path", "x", "--train_data_dir",
                                                        "y", "--sampler", "nope"], exit_on_error=False)


@error(r"unknown --sampler 'nope'; valid: .*dpmpp_2m")
def cli_unknown_sampler(ctx):
    out = ctx.tmp / "out"
    return lambda: cli.run(["--condition", str(fill_data() / "source" / "0.png"), "--model", str(tiny_sd()),
                            "--controlnet", str(ctx.base / "cn_run"), "--sampler", "nope", "--out", str(out)])


@error(r"--image .*broken\.png: cannot read it as an image")
def cli_corrupt_image(ctx):
    bad = corrupt_file(ctx.tmp / "broken.png", "png")
    return lambda: cli.run(["--image", str(bad), "--model", str(tiny_sd()), "--controlnet", str(ctx.base / "cn_run"),
                            "--out", str(ctx.tmp / "out"), "--steps", "1", "--num_images", "1"])


@error(r"steps must be an integer >= 1, got 0")
def sample_steps_0(ctx):
    s, fn = _gauss_fn()
    return lambda: sample(fn, torch.zeros(1, 2), s, steps=0)


@error(r"steps must be an integer >= 1, got 0")
def pipeline_steps_0(ctx):
    return lambda: ctx.pipe("a", np.zeros((32, 32, 3), np.uint8), steps=0, output_type="latent")


@error(r"validation_inference_steps must be >= 1, got 0", exc=ConfigError)
def rf_config_sample_steps_0(ctx):
    return lambda: parse_config(RF.TrainConfig, ["--validation_inference_steps", "0"], exit_on_error=False)


@error(r"validation_inference_steps must be >= 1, got 0", exc=ConfigError)
def cn_config_steps_0(ctx):
    return lambda: parse_config(TrainControlNetConfig, ["--pretrained_model_name_or_path", "x", "--train_data_dir",
                                                        "y", "--validation_inference_steps", "0"], exit_on_error=False)


@error(r"guidance scale must be >= 0 \(1: no guidance, 0: the unconditional model\), got -1")
def negative_guidance_core(ctx):
    s, fn = _gauss_fn()
    return lambda: classifier_free_guidance(wrap_model(lambda x, t: x, s), -1.0)


@error(r"guidance scale must be >= 0")
def negative_guidance_pipeline(ctx):
    return lambda: ctx.pipe("a", np.zeros((32, 32, 3), np.uint8), guidance_scale=-1.0, steps=1, output_type="latent")


@error(r"validation_guidance_scale must be >= 0 \(1 disables guidance\), got -2", exc=ConfigError)
def negative_guidance_rf_config(ctx):
    return lambda: parse_config(RF.TrainConfig, ["--validation_guidance_scale", "-2"], exit_on_error=False)


@error(r"validation_guidance_scale must be >= 0", exc=ConfigError)
def negative_guidance_cn_config(ctx):
    return lambda: parse_config(TrainControlNetConfig, ["--pretrained_model_name_or_path", "x", "--train_data_dir",
                                                        "y", "--validation_guidance_scale=-1"], exit_on_error=False)


@error(r"--guidance_scale must be >= 0")
def negative_guidance_cli(ctx):
    return lambda: cli.run(["--condition", str(fill_data() / "source" / "0.png"), "--model", str(tiny_sd()),
                            "--controlnet", str(ctx.base / "cn_run"), "--guidance_scale=-1",
                            "--out", str(ctx.tmp / "out")])


def _pickled_controlnet(ctx) -> Path:
    d = ctx.tmp / "pickled"
    d.mkdir()
    shutil.copy(ctx.base / "cn_run" / "config.json", d / "config.json")
    torch.save(ControlNet.from_pretrained(ctx.base / "cn_run").state_dict(), d / "diffusion_pytorch_model.bin")
    return d


@error(r"refusing to unpickle .*diffusion_pytorch_model\.bin: pickle checkpoints can run arbitrary code.*"
       r"allow_pickle=True")
def pickle_controlnet_dir_without_opt_in(ctx):
    d = _pickled_controlnet(ctx)
    return lambda: ControlNet.from_pretrained(d)


@error(r"refusing to unpickle .*\.ckpt")
def pickle_single_file_without_opt_in(ctx):
    path = ctx.tmp / "cn.ckpt"
    torch.save({"a": torch.zeros(1)}, path)
    return lambda: ControlNet.from_single_file(path)


@error(r"refusing to unpickle")
def pickle_controlnet_to_train_from(ctx):
    d = _pickled_controlnet(ctx)
    cfg = ctx.cn_resume(controlnet_model_name_or_path=str(d), resume_from_checkpoint=None)
    return lambda: train_cn(cfg)


@error(r"model\.pt is not a \.safetensors file; pickle checkpoints .* are not loaded")
def pickle_rf_weights(ctx):
    path = ctx.tmp / "model.pt"
    torch.save({"a": torch.zeros(1)}, path)
    return lambda: RF.load_trained(path)


@error(r"cannot read .*denoiser\.safetensors as safetensors .* corrupt or truncated")
def truncated_safetensors(ctx):
    f = ctx.copy("rf_run") / "checkpoint-00000001" / "denoiser.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    return lambda: load_weights(f)


@error(r"does not match the ControlNet .*\n.*unexpected keys: extra\.weight", exc=RuntimeError)
def controlnet_unexpected_key(ctx):
    from safetensors.torch import load_file, save_file

    d = ctx.tmp / "cn"
    shutil.copytree(ctx.base / "cn_run", d, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    sd = load_file(d / "diffusion_pytorch_model.safetensors")
    save_file({**sd, "extra.weight": torch.zeros(1)}, d / "diffusion_pytorch_model.safetensors")
    return lambda: ControlNet.from_pretrained(d)


@error(r"does not match the ControlNet .*\n.*missing keys: controlnet_mid_block\.bias", exc=RuntimeError)
def controlnet_missing_key(ctx):
    from safetensors.torch import load_file, save_file

    d = ctx.tmp / "cn"
    shutil.copytree(ctx.base / "cn_run", d, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    sd = load_file(d / "diffusion_pytorch_model.safetensors")
    sd.pop("controlnet_mid_block.bias")
    save_file(sd, d / "diffusion_pytorch_model.safetensors")
    return lambda: ControlNet.from_pretrained(d)


@error(r"(?s)checkpoint .*checkpoint-00000001 does not match this run's model/optimizer .*size mismatch.*resume "
       r"with the config it was saved with")
def rf_resume_with_another_model(ctx):
    cfg = ctx.rf_resume(model="DiT-Tiny/2")
    return lambda: RF.train(cfg)


@error(r"unknown config key 'learning_rat' \(from .*bad\.yaml\); did you mean 'learning_rate'", exc=ConfigError)
def config_file_unknown_key(ctx):
    (ctx.tmp / "bad.yaml").write_text("learning_rat: 1.0e-4\n")
    return lambda: parse_config(RF.TrainConfig, ["--config", str(ctx.tmp / "bad.yaml")], exit_on_error=False)


@error(r"config key 'max_train_steps' \(from .*bad\.yaml\): expected int \| None, got 'ten'", exc=ConfigError)
def config_file_wrong_type(ctx):
    (ctx.tmp / "bad.yaml").write_text("max_train_steps: ten\n")
    return lambda: parse_config(TrainControlNetConfig, ["--config", str(ctx.tmp / "bad.yaml")], exit_on_error=False)


@error(r"config key 'use_ema' \(from .*bad\.yaml\): expected bool, got 'maybe' \(use true/false\)",
       exc=ConfigError)
def config_file_wrong_bool(ctx):
    (ctx.tmp / "bad.yaml").write_text("use_ema: maybe\n")
    return lambda: parse_config(RF.TrainConfig, ["--config", str(ctx.tmp / "bad.yaml")], exit_on_error=False)


# ----------------------------------------------------------------------------------------------- trainer command lines
# Each runs the trainer's main() (the CLI) and requires exit status 2 with `prog: error: <message>` on stderr, raised
# before any model is loaded or file written (bounds, local paths, model fit, memory), or naming the file at fault.
def _bad_utf8(path: Path) -> dict:
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0].replace(b'"prompt": "', b'"prompt": "\xff\xfe ').replace(
        b'"text": "', b'"text": "\xff\xfe ')] + lines[1:]) + b"\n")
    return {}


def _metadata(folder: Path, record: dict) -> Path:
    """folder/metadata.jsonl with one record (prompt.json removed)."""
    (folder / "prompt.json").unlink(missing_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    return folder / "metadata.jsonl"


def _other_base_controlnet(ctx) -> dict:
    from controlnet.config import ControlNetConfig

    d = ctx.tmp / "cn_sdxl_like"
    d.mkdir()
    cfg = ControlNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           layers_per_block=1, cross_attention_dim=64, norm_num_groups=8)
    (d / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **cfg.to_dict()}))
    return {"controlnet_model_name_or_path": str(d)}


def _base_copy(ctx, broken: str) -> dict:
    d = ctx.tmp / "sd"
    shutil.copytree(tiny_sd(), d)
    if broken == "config":
        (d / "unet" / "config.json").write_text("")  # a kill mid-write
    else:
        (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return {"pretrained_model_name_or_path": str(d)}


def _t2i_data(ctx) -> Path:
    d = ctx.tmp / "t2i_data"
    if not d.exists():
        shutil.copytree(fill_data(32, 16), d)
    return d


BIG = str(2 ** 20)  # pixels a side: the input batch alone is terabytes
MEMORY = r"this run needs more than [\d.,]+ GiB \(.*{}.*a lower bound.*\) but the (RAM|GPU) holds [\d.]+ GiB; lower "
HUB = r"{} {} is not a local directory; hub ids are not downloaded .*huggingface-cli download"
TRAINER_CLI = [  # (id, trainer, overrides or setup(ctx) -> overrides, message)
    ("cn_adam_epsilon_0", "cn", {"adam_epsilon": "0"}, r"adam_epsilon must be > 0 \(AdamW divides by sqrt\(v\) \+ eps"),
    ("cn_learning_rate_inf", "cn", {"learning_rate": "inf"}, r"learning_rate must be a finite number >= 0, got inf"),
    ("cn_max_grad_norm_nan", "cn", {"max_grad_norm": "nan"},
     r"max_grad_norm must be a finite number >= 0 \(0 turns clipping off\), got nan"),
    ("cn_adam_beta2_1", "cn", {"adam_beta2": "1"}, r"adam_beta2 must lie in \[0, 1\), got 1\.0"),
    ("cn_resolution_0", "cn", {"resolution": "0"}, r"resolution must be > 0 pixels, got 0"),
    ("cn_resolution_negative", "cn", {"resolution": "-8"}, r"resolution must be > 0 pixels, got -8"),
    ("cn_output_dir_empty", "cn", {"output_dir": ""}, r"output_dir must not be empty"),
    ("cn_checkpoints_total_limit_0", "cn", {"checkpoints_total_limit": "0"},
     r"checkpoints_total_limit must be >= 1 .*got 0; leave it unset \(None\) to keep all"),
    ("cn_ddp_timeout_0", "cn", {"ddp_timeout": "0"}, r"ddp_timeout must be a number of seconds > 0, got 0"),
    ("cn_8bit_adam_without_bitsandbytes", "cn", {"use_8bit_adam": "true"},
     r"--use_8bit_adam needs the optional bitsandbytes package \(pip install bitsandbytes\)"),
    ("cn_hub_id_offline", "cn", {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5"},
     HUB.format("--pretrained_model_name_or_path", "runwayml/stable-diffusion-v1-5")),
    ("cn_controlnet_for_another_base", "cn", _other_base_controlnet,
     r"--controlnet_model_name_or_path .*cn_sdxl_like was built for another base model than .*block_out_channels: "
     r"ControlNet \(16, 32\) vs UNet \(32, 64\); cross_attention_dim: ControlNet 64 vs UNet 32\)"),
    ("cn_truncated_unet_config", "cn", lambda ctx: _base_copy(ctx, "config"),
     r"unet/config\.json is not valid JSON .*the file is empty, truncated or corrupt"),
    ("cn_missing_unet_weights", "cn", lambda ctx: _base_copy(ctx, "weights"),
     r"cannot load the Stable Diffusion components from .*sd: OSError: .*diffusion_pytorch_model"),
    ("cn_caption_column_missing", "cn", lambda ctx: _metadata(ctx.copy("cn_data"), {"file_name": "target/0.png",
                                                                                  "conditioning_image": "source/0.png"}),
     r"no caption column 'text'; columns: .* Set --caption_column"),
    ("cn_invalid_utf8_caption", "cn", lambda ctx: _bad_utf8(ctx.copy("cn_data") / "prompt.json"),
     r"prompt\.json:1: not valid UTF-8 \(byte 0xff at column \d+\); save the file as UTF-8"),
    ("cn_validation_image_missing", "cn", {"validation_image": '["nope.png"]'},
     r"--validation_image: \['nope\.png'\] not found"),
    ("cn_resolution_beyond_memory", "cn", {"resolution": BIG}, MEMORY.format("input batch")),
    ("cn_validation_steps_beyond_memory", "cn", {"validation_prompt": '["a"]', "validation_inference_steps": "10000000000000"},
     MEMORY.format("validation time grid")),
    ("rf_adam_epsilon_0", "rf", {"adam_epsilon": "0"}, r"adam_epsilon must be > 0"),
    ("rf_learning_rate_nan", "rf", {"learning_rate": "nan"}, r"learning_rate must be a finite number >= 0, got nan"),
    ("rf_max_grad_norm_inf", "rf", {"max_grad_norm": "inf"}, r"max_grad_norm must be a finite number >= 0"),
    ("rf_output_dir_empty", "rf", {"output_dir": " "}, r"output_dir must not be empty"),
    ("rf_checkpoints_total_limit_negative", "rf", {"checkpoints_total_limit": "-1"},
     r"checkpoints_total_limit must be >= 1"),
    ("rf_ddp_timeout_negative", "rf", {"ddp_timeout": "-5"}, r"ddp_timeout must be a number of seconds > 0, got -5"),
    ("rf_vae_hub_id", "rf", {"vae": "stabilityai/sd-vae-ft-mse"}, HUB.format("--vae", "stabilityai/sd-vae-ft-mse")),
    ("rf_sd3_hub_id", "rf", {"backbone": "sd3", "pretrained_transformer": "stabilityai/sd3-medium"},
     HUB.format("--pretrained_transformer", "stabilityai/sd3-medium")),
    ("rf_data_dir_missing", "rf", lambda ctx: {"data_dir": str(ctx.tmp / "nope")}, r"--data_dir .*nope does not exist"),
    ("rf_invalid_utf8_caption", "rf", lambda ctx: _bad_utf8(_metadata(ctx.copy("rf_images"),
                                                                        {"file_name": "0.png", "text": "a"})),
     r"rf_images/metadata\.jsonl:1: not valid UTF-8"),
    ("rf_batch_beyond_memory", "rf", {"train_batch_size": "1000000000"}, MEMORY.format("input batch")),
    ("rf_sample_steps_beyond_memory", "rf", {"validation_inference_steps": "1000000000000"}, MEMORY.format("sample time grid")),
    ("t2i_learning_rate_inf", "t2i", {"learning_rate": "inf"}, r"learning_rate must be a finite number >= 0, got inf"),
    ("t2i_vae_learning_rate_nan", "t2i", {"vae_learning_rate": "nan"}, r"vae_learning_rate must be a finite number"),
    ("t2i_max_grad_norm_negative", "t2i", {"max_grad_norm": "-1"}, r"max_grad_norm must be a finite number >= 0"),
    ("t2i_resolution_0", "t2i", {"resolution": "0"}, r"resolution must be > 0 pixels, got 0"),
    ("t2i_output_dir_empty", "t2i", {"output_dir": ""}, r"output_dir must not be empty"),
    ("t2i_checkpoints_total_limit_0", "t2i", {"checkpoints_total_limit": "0"}, r"checkpoints_total_limit must be >= 1"),
    ("t2i_pretrained_vae_hub_id", "t2i", {"pretrained_vae": "stabilityai/sd-vae-ft-mse"},
     HUB.format("--pretrained_vae", "stabilityai/sd-vae-ft-mse")),
    ("t2i_data_dir_missing", "t2i", lambda ctx: {"train_data_dir": str(ctx.tmp / "nope")},
     r"--train_data_dir .*nope does not exist"),
    ("t2i_invalid_utf8_caption", "t2i", lambda ctx: _bad_utf8(_t2i_data(ctx) / "prompt.json"),
     r"t2i_data/prompt\.json:1: not valid UTF-8"),
    ("t2i_resolution_beyond_memory", "t2i", {"resolution": BIG}, MEMORY.format("input batches")),
]


def _trainer_cli(trainer: str, over):
    def fn(ctx):
        if over == {"use_8bit_adam": "true"} and importlib.util.find_spec("bitsandbytes"):
            pytest.skip("bitsandbytes is installed")
        extra = over(ctx) if callable(over) else over  # a setup returns its overrides (or a file it broke)
        extra = extra if isinstance(extra, dict) else {}
        if trainer == "cn":  # new runs in new dirs: nothing may appear under ctx.tmp
            import train_controlnet as script
            argv = argv_of(cn_cfg(ctx.tmp / "cn_new", train_data_dir=str(ctx.copy("cn_data")), max_train_steps=2))
        elif trainer == "rf":
            import train_rf_dit as script
            argv = argv_of(rf_cfg(ctx.tmp / "rf_new", dataset="folder", data_dir=str(ctx.copy("rf_images")),
                                  train_batch_size=4, max_train_steps=2))
        else:
            import train_t2i as script
            argv = argv_of(t2i_cfg(ctx.tmp / "t2i", train_data_dir=str(_t2i_data(ctx))))
        return exit2(script.main, argv + [f"--{k}={v}" for k, v in extra.items()])
    return fn


for _id, _trainer, _over, _match in TRAINER_CLI:
    _fn = _trainer_cli(_trainer, _over)
    _fn.__name__ = _id
    error(_match, exc=Exit2)(_fn)


@pytest.mark.parametrize("setup, exc, match, guard", ERRORS)
def test_bad_input_fails_clearly_and_changes_nothing(ctx, setup, exc, match, guard):
    call = setup(ctx)
    watched = ctx.tmp if guard == "all" else ctx.tmp / "rf_run" if "rf_" in setup.__name__ \
        else ctx.tmp / "cn_run"
    before = snapshot(watched)
    if guard != "all":
        before = {k: v for k, v in before.items() if k.startswith("checkpoint")}
    with pytest.raises(exc, match=match):
        call()
    after = snapshot(watched)
    if guard != "all":
        after = {k: v for k, v in after.items() if k.startswith("checkpoint")}
    assert after == before  # nothing lost, nothing half-written


# ----------------------------------------------------------------------------------------------- repairs
def _img(mode: str, size=(12, 10)):
    h, w = size
    if mode == "L":
        return Image.fromarray(np.full((h, w), 120, np.uint8)), (120, 120, 120)
    if mode == "RGBA":  # alpha dropped (not composited)
        return Image.fromarray(np.dstack([np.full((h, w, 3), RGB, np.uint8), np.full((h, w), 30, np.uint8)])), RGB
    if mode == "I;16":  # 16-bit grayscale PNG: 51400 / 257 = 200
        return Image.fromarray(np.full((h, w), 51400, np.uint16)), (200, 200, 200)
    if mode == "P":  # adaptive palette: the one colour is kept exactly
        return Image.fromarray(np.full((h, w, 3), RGB, np.uint8)).quantize(4), RGB
    return Image.fromarray(np.full((h, w, 3), RGB, np.uint8)), RGB


REPAIRS = [("grayscale", "L", (12, 10)), ("rgba", "RGBA", (12, 10)), ("16bit_png", "I;16", (12, 10)),
           ("palette", "P", (12, 10)), ("tiny_1x1", "RGB", (1, 1)), ("tiny_2x3", "RGB", (2, 3)),
           ("huge_768x1024", "RGB", (768, 1024))]


@pytest.mark.parametrize("name, mode, size", REPAIRS, ids=[r[0] for r in REPAIRS])
def test_images_are_repaired_the_documented_way(tmp_path, pipe, name, mode, size):
    """Every loader (RF image folders, ControlNet data, pipeline conditions, cn-sample) converts to RGB and resizes
    / center-crops to the training size, preserving the colour."""
    img, rgb = _img(mode, size)
    path = tmp_path / "img" / "a.png"
    path.parent.mkdir()
    img.save(path)
    assert Image.open(path).mode == mode
    want = torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 8, 8)

    rf = ImageFolderDataset(path.parent, size=8, channels=3)[0]["x"]
    torch.testing.assert_close((rf + 1) * 127.5, want, atol=0.51, rtol=0)
    gray = ImageFolderDataset(path.parent, size=8, channels=1)[0]["x"]
    assert gray.shape == (1, 8, 8) and abs(((gray + 1) * 127.5).mean().item() - np.dot(rgb, (.299, .587, .114))) < 1
    item = ControlNetDataset([{"image": path, "conditioning_image": path, "text": "x"}], 8)[0]
    torch.testing.assert_close((item["pixel_values"] + 1) * 127.5, want, atol=0.51, rtol=0)
    torch.testing.assert_close(item["conditioning_pixel_values"] * 255, want, atol=0.51, rtol=0)
    assert (cli.read_image(str(path), "--image") == np.array(rgb, np.uint8)).all()  # cn-sample's reader
    cond = pipe.prepare_condition(str(path), batch=2, height=16, width=24)
    assert cond.shape == (2, 3, 16, 24)
    torch.testing.assert_close(cond * 255, want[:, :1, :1].expand(2, 3, 16, 24), atol=0.51, rtol=0)


def test_condition_of_another_size_is_resized(tmp_path):
    """ControlNet data: a condition whose size differs from its image is resized / cropped to the same R x R."""
    Image.fromarray(np.full((40, 24, 3), RGB, np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(tmp_path / "i.png")
    item = ControlNetDataset([{"image": tmp_path / "i.png", "conditioning_image": tmp_path / "c.png", "text": "x"}],
                             16)[0]
    assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 16, 16)


def test_skip_bad_images_skips_and_counts(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fill_data(), data)
    corrupt_file(data / "target" / "2.png", "jpeg")
    cfg = cn_cfg(tmp_path / "o", train_data_dir=str(data), skip_bad_images=True)
    from controlnet.training import build_dataset

    ds = build_dataset(cfg)
    assert len(ds) == 31 and [s[0] for s in ds.skipped] == [2] and "truncated" in ds.skipped[0][2]
