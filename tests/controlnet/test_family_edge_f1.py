"""A short SDXL-ControlNet / SD3-ControlNet run on the fill data raises edge F1 over the untrained ControlNet.

The runs are the benchmarks' (benchmarks/controlnet_sdxl_edges.py, benchmarks/controlnet_sd3_edges.py: tiny
random-weight base at 64 px with the shipped default model's fill VAE, 128 training / 16 held-out fill samples),
cut to 60 steps x batch 8 and to the one noise level where an x0-prediction still shows the outline but not yet
the image: SDXL timestep 250, SD3 t = 0.5. Measured gains in edge F1 of decoded x0-predictions (seeds 0-3):
SDXL (lr 3e-3) +0.110 / +0.071 / +0.083 / +0.082, SD3 (lr 2e-3) +0.151 / +0.114 / +0.070 / +0.129; the margin, 0.035,
is half the smallest. docs/train_controlnet.md has these and the full-length figures.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
COMMON = ["--steps", "60", "--batch", "8", "--n_train", "128", "--n_eval", "16", "--sample_steps", "0", "--seed", "0"]
CASES = {  # family: (script, extra flags, key of the scored noise level, margin)
    "sdxl": ("controlnet_sdxl_edges.py", ["--lr", "3e-3", "--timesteps", "250"], 250, 0.035),
    "sd3": ("controlnet_sd3_edges.py", ["--lr", "2e-3", "--times", "0.5"], 0.5, 0.035),
}


def load(script: str):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCHMARKS / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("family", sorted(CASES))
def test_short_run_raises_edge_f1_over_untrained_controlnet(family):
    script, flags, key, margin = CASES[family]
    bench = load(script)
    args = bench.parse([*COMMON, *flags, "--threads", str(torch.get_num_threads())])
    before, after = bench.run(args)[:2]
    (f1_before, mse_before), (f1_after, mse_after) = before[key], after[key]
    assert f1_after - f1_before >= margin, (family, f1_before, f1_after)
    assert mse_after < mse_before, (family, mse_before, mse_after)  # the x0-prediction moved towards the data
