"""benchmarks/full_size.py at tiny size, in process: the components it builds load in both stacks, the cn-sample path
matches diffusers' StableDiffusionControlNetPipeline and the training step matches diffusers' ControlNetModel step."""
import sys

import numpy as np
import pytest

from .sd_fixtures import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import full_size  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return full_size.build_components(tmp_path_factory.mktemp("full_size"), "tiny")


def test_sample_path_matches_diffusers(root):
    ours, ref = (full_size.sample_variant(v, root) for v in ("ours", "diffusers"))
    assert ours["images"].shape == ref["images"].shape == (1, 64, 64, 3)
    assert ref["images"].std() > 0.05  # not a flat image
    assert np.abs(ours["images"] - ref["images"]).max() <= full_size.IMAGE_TOL["fp32"] / 100


def test_controlnet_residuals_change_the_images(root):
    """The ControlNet's zero convolutions are filled, so the parity above covers its residuals."""
    from controlnet.cli import load_pipeline

    pipe = load_pipeline(root / "base", root / "controlnet")
    cond, _, latents = full_size.inputs(64)
    kw = dict(latents=latents, sampler="ddim", steps=2, time_grid="trailing", output_type="latent")
    on, off = (pipe(full_size.PROMPT, cond, controlnet_conditioning_scale=s, **kw).images for s in (1.0, 0.0))
    assert (on - off).abs().max() > 0.1


def test_training_step_matches_diffusers(root):
    ours, ref = (full_size.train_variant(v, root, steps=2) for v in ("ours", "diffusers"))
    np.testing.assert_allclose(ours["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(ours["grad_norm"], ref["grad_norm"], rtol=1e-4)
    assert ours["grad_norm"][0] > 0 and ours["it_s"] > 0


def test_table_verdicts():
    row = dict(wall_s=1.0, cpu_s=1.0, peak_rss_mib=100.0, loss=[1.0])
    res = {"train": {"ours": row, "diffusers": row}, "sample": {"ours": {**row, "cpu_s": 1.2}, "diffusers": row}}
    text, ok = full_size.table(res, 1e-6, 0.2, "cpu")
    assert not ok and "| sample | ours | 1.00 | 1.20 | 100 | - | 1.200 | 1.000 | FAIL (<= 1.1) |" in text
    assert "| train | ours | 1.00 | 1.00 | 100 | - | 1.000 | 1.000 | PASS (<= 1.0) |" in text
    assert not full_size.table({**res, "sample": {"ours": row, "diffusers": row}}, 2e-3, 0.2, "cpu")[1]
