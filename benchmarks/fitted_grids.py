"""Grids fitted to a model (diffusion.optimize_timesteps) vs the best named grid, on exact Gaussian-mixture scores
(diffusion.gmm), so every error is the grid's + sampler's. Measured on held-out x_T.

    python benchmarks/fitted_grids.py [--fit 128] [--held_out 4000] [--max_evals 200]

Problems: a 32-D 16-component mixture (random_mixture) and an anisotropic 16-D 8-component one (axis scales 3.2 ->
0.03, component stds 0.02-0.1). Schedules: the linear DDPM table (the default model's) and rectified flow. Each
grid is fitted on --fit prior samples (seeds 0..) and measured on --held_out others (seeds 10000..): RMSE to a 200-step
DPM-Solver++(2M) log-SNR solution of the same x_T, and sliced W2 to the exact mixture (floor: exact samples of the
same size). "best named" is the named grid (TIME_GRIDS) with the lowest held-out RMSE. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from diffusion import Discrete, RectifiedFlow, optimize_timesteps, prior_sample, sample  # noqa: E402
from diffusion.fitted_grid import named_grids, reference_solution, rmse  # noqa: E402
from diffusion.gmm import GaussianMixture, SlicedW2, random_mixture  # noqa: E402


def anisotropic(dim: int = 16, k: int = 8, seed: int = 1) -> GaussianMixture:
    """Means with per-axis scales 10^0.5 .. 10^-1.5 and small component stds: data on many scales at once."""
    g = random_mixture(dim, k, seed=seed, std_range=(0.02, 0.1))
    scales = 10 ** torch.linspace(0.5, -1.5, dim, dtype=torch.float64)
    return GaussianMixture(g.means * scales, g.stds, g.weights)


PROBLEMS = {"32-D, 16 comp.": lambda: random_mixture(32, 16, seed=0), "anisotropic 16-D, 8 comp.": anisotropic}
SCHEDULES = {"VP table": lambda: Discrete("linear"), "RF": lambda: RectifiedFlow()}
SAMPLERS, NFES = ("dpmpp_2m", "unipc"), (5, 10)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", type=int, default=128)
    p.add_argument("--held_out", type=int, default=4000)
    p.add_argument("--max_evals", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print("| problem | schedule | sampler | NFE | best named grid | RMSE named / fitted | sliced W2 named / fitted "
          "(floor) | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for pname, make in PROBLEMS.items():
        mix = make()
        sw2 = SlicedW2(mix, levels=a.held_out)
        floor = sw2(mix.sample(a.held_out, torch.Generator().manual_seed(1)))
        for sname, make_schedule in SCHEDULES.items():
            schedule = make_schedule()
            fn = mix.denoiser(schedule)
            x_fit = prior_sample((a.fit, mix.dim), schedule, 0, dtype=torch.float64)
            x_held = prior_sample((a.held_out, mix.dim), schedule, 10_000, dtype=torch.float64)
            ref_fit, ref_held = reference_solution(fn, schedule, x_fit), reference_solution(fn, schedule, x_held)
            converged = rmse(ref_held, reference_solution(fn, schedule, x_held, steps=400))
            for sampler in SAMPLERS:
                for nfe in NFES:
                    t0 = time.time()
                    fit = optimize_timesteps(fn, schedule, sampler, nfe, x_fit, reference=ref_fit,
                                             max_evals=a.max_evals)
                    seconds = time.time() - t0
                    out = {k: sample(fn, x_held, schedule, sampler, timesteps=ts)
                           for k, ts in {**named_grids(schedule, nfe), "fitted": fit.timesteps}.items()}
                    err = {k: rmse(x, ref_held) for k, x in out.items()}
                    best = min((k for k in err if k != "fitted"), key=err.get)
                    print(f"| {pname} | {sname} | {sampler} | {nfe} | {best} | {err[best]:.4f} / {err['fitted']:.4f} "
                          f"({err[best] / err['fitted']:.1f}x) | {sw2(out[best]):.4f} / {sw2(out['fitted']):.4f} "
                          f"({floor:.4f}) | {seconds:.1f} |", flush=True)
            print(f"<!-- {pname}, {sname}: reference 200 vs 400 steps RMSE {converged:.1e} -->", flush=True)


if __name__ == "__main__":
    main()
