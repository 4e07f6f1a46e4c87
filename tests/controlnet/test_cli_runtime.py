"""cn-sample / pipeline device and precision: --dtype on the CPU, float32 sampler state, settings.json, --device
errors, model CPU offload wiring, SDPA attention, --compile (slow; CN_SLOW_TESTS=1)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.cli import load_pipeline, main, run
from controlnet.runtime import resolve_device, resolve_dtype

COND = np.zeros((32, 32, 3), np.uint8)
COND[8:24, 12] = COND[8:24, 20] = COND[8, 12:21] = 255
KW = dict(height=32, width=32, steps=2, seed=3, guidance_scale=3.0, output_type="np")
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--no_progress", "--num_images", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def fp32_images():
    return load_pipeline()("red circle", COND, **KW).images


@pytest.fixture(scope="module")
def cond_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("cond") / "cond.png"
    Image.fromarray(COND).save(path)
    return path


@pytest.mark.parametrize("dtype, max_tol, mean_tol", [(torch.bfloat16, 0.08, 0.01), (torch.float16, 0.01, 1e-3)])
def test_half_precision_on_cpu_is_close_to_fp32(dtype, max_tol, mean_tol, fp32_images):
    """bf16 (8-bit mantissa) and fp16 (11-bit) networks on the CPU, images in [0, 1] vs the fp32 run; fp16 runs on
    the CPU with torch >= 2.1 kernels (allowed, documented as slower than fp32)."""
    got = load_pipeline(dtype=dtype)("red circle", COND, **KW).images
    diff = np.abs(got - fp32_images)
    assert 0 < diff.max() <= max_tol and diff.mean() <= mean_tol, (diff.max(), diff.mean())


def test_sampler_state_stays_float32_while_the_network_runs_in_bf16():
    pipe = load_pipeline(dtype=torch.bfloat16)
    seen_net, seen_x = [], []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen_net.append(args[0].dtype))
    try:
        pipe("red circle", COND, callback=lambda info: seen_x.append((info["x"].dtype, info["x0"].dtype)), **KW)
    finally:
        hook.remove()
    assert set(seen_net) == {torch.bfloat16} and len(seen_net) == 2  # 2 steps, CFG batched
    assert set(seen_x) == {(torch.float32, torch.float32)} and len(seen_x) == 2


def test_settings_json_records_the_run_and_redraws_it(cond_png, tmp_path):
    out = tmp_path / "a"
    run(["--condition", str(cond_png), "--prompt", "blue circle", "--dtype", "bf16", "--sampler", "euler",
         "--out", str(out), *FAST])
    s = json.loads((out / "settings.json").read_text())
    a = s["arguments"]
    assert (a["device"], a["dtype"], a["steps"], a["height"], a["sampler"]) == ("cpu", "bf16", 2, 32, "euler")
    assert a["time_grid"] is not None and os.path.isabs(a["model"]) and os.path.isabs(a["controlnet"])
    assert s["seeds"] == [5, 6] and s["images"] == ["sample_00.png", "sample_01.png"]
    assert s["versions"]["torch"] == torch.__version__ and s["versions"]["diffusers"] and s["family"] == "sd"
    argv = []  # the recorded arguments, replayed: the same images
    for k, v in a.items():
        if v is True:
            argv.append(f"--{k}")
        elif v not in (None, False) and k != "out":
            argv += [f"--{k}", str(v)]
    run([*argv, "--out", str(tmp_path / "b")])
    for name in s["images"]:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "b" / name)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_naming_the_fix(cond_png, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--condition", str(cond_png), "--device", "cuda", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device cuda: CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--device", "tpu"], "unknown --device 'tpu'; valid: auto, cpu, cuda"),
    (["--device", "cpu", "--cpu_offload"], "drop --cpu_offload"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_device_and_dtype_errors(flags, msg, cond_png, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--condition", str(cond_png), "--out", str(tmp_path / "o"), *FAST, *flags])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_default_device_and_dtype():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else dev.type)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_model_cpu_offload_hooks_every_network_and_keeps_the_images(fp32_images):
    """On a CPU-only machine the execution device is the CPU: the hooks are wired (VAE decode included) and the
    images unchanged; tests/gpu checks the moves to CUDA."""
    pipe = load_pipeline()
    pipe.enable_model_cpu_offload("cpu")
    assert all(hasattr(m, "_hf_hook") for m in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder))
    assert pipe.device == torch.device("cpu")
    np.testing.assert_allclose(pipe("red circle", COND, **KW).images, fp32_images, atol=1e-6, rtol=0)


def test_attention_is_sdpa():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_pipeline()
    attns = [m for net in (pipe.unet, pipe.controlnet, pipe.vae) for m in net.modules() if hasattr(m, "processor")]
    assert len(attns) > 3 and {type(m.processor) for m in attns} == {AttnProcessor2_0}
    assert pipe.text_encoder.config._attn_implementation == "sdpa"


@pytest.mark.skipif(os.environ.get("CN_SLOW_TESTS") != "1", reason="torch.compile (inductor) takes ~4 min on the "
                    "shared CPU; CN_SLOW_TESTS=1 runs it")
def test_compile_gives_the_uncompiled_images(fp32_images):
    pipe = load_pipeline(compile=True)
    got = pipe("red circle", COND, **KW).images
    np.testing.assert_allclose(got, fp32_images, atol=1e-4)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_model_cpu_offload_sdxl_and_sd3(family):
    """Every text encoder, the backbone, the ControlNet and the VAE are hooked; the images are unchanged."""
    from .sd_fixtures import controlnet_dir, tiny_sd3, tiny_sdxl

    root = tiny_sdxl() if family == "sdxl" else tiny_sd3()
    size = 32 if family == "sdxl" else 64
    cond = np.zeros((size, size, 3), np.uint8)
    cond[size // 4:-size // 4, size // 2] = 255
    kw = dict(height=size, width=size, steps=2, seed=1, output_type="np",
              sampler="dpmpp_2m" if family == "sdxl" else "flow_euler")
    ref = load_pipeline(root, controlnet_dir(root))("a red circle", cond, **kw).images
    pipe = load_pipeline(root, controlnet_dir(root))
    hooks = pipe.enable_model_cpu_offload("cpu") or pipe._offload_hooks
    names = ["text_encoder", "text_encoder_2", *(["text_encoder_3"] if family == "sd3" else []), "vae"]
    hooked = [pipe.backbone, *([pipe.controlnet] if not isinstance(pipe.controlnet, list) else pipe.controlnet),
              *(getattr(pipe, n) for n in names)]
    assert len(hooks) == len(hooked) and all(hasattr(m, "_hf_hook") for m in hooked)
    np.testing.assert_allclose(pipe("a red circle", cond, **kw).images, ref, atol=1e-6, rtol=0)
