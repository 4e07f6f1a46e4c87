"""benchmarks/gmm_samplers.py: its exact model and its --quick run (the targets of issue 17 printed in one run)."""
import importlib.util
from pathlib import Path

import torch

from diffusion import Discrete, sample
from diffusion.gmm import random_mixture

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gmm_samplers.py"


def load_benchmark(path=SCRIPT):
    spec = importlib.util.spec_from_file_location("gmm_samplers_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exact_model_evaluates_each_sample_at_its_own_time():
    """dpm_adaptive steps samples apart (per-sample t): the exact model must use each sample's own t."""
    bench = load_benchmark()
    gm, schedule = random_mixture(4, 3, seed=0), Discrete("scaled_linear")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x0, eps = bench.exact_model(gm, schedule)(x, t)
    a, s = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(x0, gm.posterior_mean(x, a, s))
    torch.testing.assert_close(eps, (x - a[:, None] * x0) / s[:, None])
    # and dpm_adaptive on it converges to the many-step solution
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fn = bench.exact_model(gm, schedule)
    ref = sample(fn, x_T, schedule, "dpmpp_2m", steps=400, time_grid="log_snr")
    out = sample(fn, x_T, schedule, "dpm_adaptive", time_grid="log_snr", rtol=0.01)
    assert (out - ref).pow(2).mean().sqrt() < 0.01 * ref.pow(2).mean().sqrt()


def test_quick_run_prints_the_three_targets(capsys):
    bench = load_benchmark()
    bench.PROBLEMS = {k: v for k, v in list(bench.PROBLEMS.items())[:2]}  # a test-sized run: 2 problems, 2 samplers
    bench.OURS_SAMPLERS, bench.SECOND_ORDER = ["ddim", "dpmpp_2m"], ["dpmpp_2m"]
    bench.THEIRS = {k: bench.THEIRS[k] for k in ("DPM++2M", "DPM SDE")}
    bench.main(["--quick", "--samples", "256", "--fit", "16", "--fit_evals", "4", "--repeats", "1", "--no-plot"])
    out = capsys.readouterr().out
    for k in (5, 10):
        assert sum(f"NFE {k}: ours " in line for line in out.splitlines()) == len(bench.PROBLEMS)
    assert "default grid within 1.2x of the best grid: worst ratio" in out
    assert sum(line.startswith(("PASS overhead", "FAIL overhead")) for line in out.splitlines()) == 5
    assert "[fitted]" in out and "diffusers DPM SDE karras" in out
