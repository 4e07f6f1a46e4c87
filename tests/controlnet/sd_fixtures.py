"""Offline fixtures built once per test session by the real scripts: a tiny SD1.5-layout pipeline and fill data."""
import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import make_fill_dataset  # noqa: E402
import make_tiny_sd  # noqa: E402
import make_tiny_sd3  # noqa: E402
import make_tiny_sdxl  # noqa: E402

RES = 32  # pixels; latents are 4x4


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    d = Path(tempfile.mkdtemp(prefix="controlnet_fixtures_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.lru_cache(maxsize=None)
def tiny_sd(prediction_type: str = "epsilon") -> Path:
    """scripts/make_tiny_sd.py output (32 px, 4x4 latents); v_prediction: same weights, scheduler edited."""
    out = _root() / f"tiny-sd-{prediction_type}"
    if prediction_type == "epsilon":
        make_tiny_sd.make_tiny_sd(out, resolution=RES, seed=0)
    else:
        import json
        shutil.copytree(tiny_sd("epsilon"), out)
        f = out / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": prediction_type}))
    return out


@functools.lru_cache(maxsize=None)
def tiny_sdxl() -> Path:
    """scripts/make_tiny_sdxl.py output (32 px, 4x4 latents); its ControlNet is the sibling <dir>-controlnet."""
    return make_tiny_sdxl.make_tiny_sdxl(_root() / "tiny-sdxl", resolution=32, seed=0)


@functools.lru_cache(maxsize=None)
def tiny_sd3(t5: bool = True) -> Path:
    """scripts/make_tiny_sd3.py output (64 px, 16x8x8 latents), with or without T5; ControlNet in <dir>-controlnet."""
    return make_tiny_sd3.make_tiny_sd3(_root() / ("tiny-sd3" if t5 else "tiny-sd3-no-t5"), resolution=64, seed=0, t5=t5)


def controlnet_dir(pipeline_dir: Path) -> Path:
    return pipeline_dir.with_name(pipeline_dir.name + "-controlnet")


@functools.lru_cache(maxsize=None)
def fill_data(n: int = 32, size: int = RES, seed: int = 0, fmt: str = "both") -> Path:
    """scripts/make_fill_dataset.py output (read-only for tests: copy it before corrupting files)."""
    return make_fill_dataset.write_fill_dataset(_root() / f"fill-{n}-{size}-{seed}-{fmt}", n, size, seed, fmt)


def assert_cn_sample_names_corrupt_part(pipeline_dir: Path, part: str, msg: str, condition, tmp_path: Path,
                                        capsys) -> None:
    """A copy of a fixture pipeline with `part` damaged (a weights file cut in half, merges.txt with its header
    only, anything else emptied): cn-sample exits 2 with `msg` in its error and writes no output."""
    import pytest

    from controlnet.cli import main

    model = shutil.copytree(pipeline_dir, tmp_path / "m")
    f = model / part
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2] if part.endswith("safetensors") else
                  b"#version: 0.2\n" if part.endswith("merges.txt") else b"")
    condition.save(tmp_path / "cond.png")
    with pytest.raises(SystemExit) as e:
        main(["--condition", str(tmp_path / "cond.png"), "--model", str(model), "--controlnet",
              str(controlnet_dir(pipeline_dir)), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def assert_seed_not_batch_and_scale_zero(pipe, prompts: list, condition, **kw) -> None:
    """Sample i of a batch seeded s equals a lone sample seeded s + i (prior, condition and sampler noise all come
    from its generator) and differs from seed s + i + 1; conditioning scale 0 equals no ControlNet. Needs 2 prompts
    and a stochastic sampler in kw."""
    import torch

    batch = pipe(prompts, condition, seed=5, num_images_per_prompt=2, **kw).images
    one = pipe(prompts[1], condition, seed=7, **kw).images
    torch.testing.assert_close(batch[2:3], one, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(batch[2:3], pipe(prompts[1], condition, seed=8, **kw).images, atol=1e-3)
    zero = pipe(prompts[0], condition, seed=5, controlnet_conditioning_scale=0.0, **kw).images
    saved, pipe.controlnet = pipe.controlnet, None
    try:
        torch.testing.assert_close(zero, pipe(prompts[0], seed=5, **kw).images, atol=1e-4, rtol=1e-5)
    finally:
        pipe.controlnet = saved
    assert (batch[:1] - zero).abs().max() > 1e-2
