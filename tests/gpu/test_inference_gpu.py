"""cn-sample on CUDA (make gpu-check; skipped without CUDA): fp16 / bf16 networks with a float32 sampler state match
the CPU fp32 images; model CPU offload moves every network to the GPU only while it runs and gives the same images."""
import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.cli import load_pipeline, run

pytestmark = pytest.mark.gpu

COND = np.zeros((64, 64, 3), np.uint8)
COND[16:48, 24] = COND[16:48, 40] = COND[16, 24:41] = 255
KW = dict(height=64, width=64, steps=4, seed=3, guidance_scale=3.0, output_type="np")
TOL = {torch.float16: (0.02, 2e-3), torch.bfloat16: (0.08, 0.01), torch.float32: (2e-3, 2e-4)}  # max, mean in [0, 1]


@pytest.fixture(scope="module")
def cpu_fp32():
    return load_pipeline()("red circle", COND, **KW).images


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_images_match_cpu_fp32(dtype, cpu_fp32):
    pipe = load_pipeline(device="cuda", dtype=dtype)
    xs = []
    got = pipe("red circle", COND, callback=lambda info: xs.append(info["x"].dtype), **KW).images
    diff = np.abs(got - cpu_fp32)
    assert diff.max() <= TOL[dtype][0] and diff.mean() <= TOL[dtype][1], (diff.max(), diff.mean())
    assert set(xs) == {torch.float32}


def test_cpu_offload_moves_networks_only_while_used(cpu_fp32):
    pipe = load_pipeline(device="cuda", dtype=torch.float16, cpu_offload=True)
    where = {}
    for name in ("text_encoder", "unet", "controlnet", "vae"):
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, name=name: where.setdefault(name, next(m.parameters()).device.type))
    torch.cuda.reset_peak_memory_stats()
    got = pipe("red circle", COND, **KW).images
    assert {n: where.get(n) for n in ("text_encoder", "unet", "controlnet")} == dict.fromkeys(
        ("text_encoder", "unet", "controlnet"), "cuda")
    assert all(next(getattr(pipe, n).parameters()).device.type == "cpu" for n in ("unet", "vae", "text_encoder"))
    diff = np.abs(got - cpu_fp32)
    assert diff.max() <= TOL[torch.float16][0], diff.max()


def test_cli_fp16_default_on_cuda(tmp_path):
    Image.fromarray(COND).save(tmp_path / "c.png")
    run(["--condition", str(tmp_path / "c.png"), "--steps", "2", "--height", "64", "--width", "64", "--num_images",
         "1", "--no_progress", "--out", str(tmp_path / "o")])
    import json
    s = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert s["arguments"]["device"] == "cuda" and s["arguments"]["dtype"] == "fp16"
    assert s["device_name"] == torch.cuda.get_device_name(0)


def test_compile_on_cuda(cpu_fp32):
    pipe = load_pipeline(device="cuda", dtype=torch.float16, compile=True)
    got = pipe("red circle", COND, **KW).images
    assert np.abs(got - cpu_fp32).max() <= TOL[torch.float16][0]
