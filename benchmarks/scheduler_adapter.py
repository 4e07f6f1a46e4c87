#!/usr/bin/env python
"""Per-step cost of diffusion.ProjectScheduler (a project sampler driven through diffusers' step() loop) against
diffusion.sample() and diffusers' own scheduler, the network replaced by a precomputed eps tensor.

    python benchmarks/scheduler_adapter.py            # ~15 s on 1 core
    python benchmarks/scheduler_adapter.py --quick

CPU time (all threads: the adapter's sampler runs in a worker thread) per step of 50-step loops on a 4x4x64x64
float32 latent, set_timesteps / grid construction included, median of the repeats, one intra-op thread.
"""
import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

from diffusion import ProjectScheduler, sample, schedule_from_diffusers, wrap_model

TABLE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
CASES = [("ddim", DDIMScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler), ("heun", HeunDiscreteScheduler)]


def cpu_per_step(fn, steps: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) / steps)
    return statistics.median(times)


def loop(scheduler, x, out, steps):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 repeats instead of 21")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    steps, repeats = 50, 5 if a.quick else 21
    g = torch.Generator().manual_seed(0)
    x_T, out = torch.randn(4, 4, 64, 64, generator=g), 0.1 * torch.randn(4, 4, 64, 64, generator=g)
    print(f"ms CPU per step, {steps} steps, latent {tuple(x_T.shape)}, median of {repeats}")
    print("| sampler | diffusion.sample | ProjectScheduler in a step() loop | diffusers scheduler |")
    print("|---|---|---|---|")
    for name, cls in CASES:
        theirs = cls(**TABLE)
        schedule = schedule_from_diffusers(theirs)
        model_fn = wrap_model(lambda x, s: out, schedule, "eps", "timestep")
        ours = ProjectScheduler.from_scheduler(theirs, sampler=name)
        row = [cpu_per_step(lambda: sample(model_fn, x_T, schedule, name, steps=steps), steps, repeats),
               cpu_per_step(lambda: loop(ours, x_T, out, steps), steps, repeats),
               cpu_per_step(lambda: loop(theirs, x_T, out, steps), steps, repeats)]
        print(f"| {name} | " + " | ".join(f"{1e3 * v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
