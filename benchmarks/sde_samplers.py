"""Benchmark: score-SDE samplers at equal NFE, PF-ODE solver cost, and PF-ODE likelihood, on the exact
32-D 16-component Gaussian mixture of diffusion.gmm.random_mixture (so every error is the sampler's).

    python benchmarks/sde_samplers.py [--quick] [--samples N] [--nfe K] [--points P]

Defaults: N = 2000 samples, K = 1000, P = 256 (about 5 min on 2 cores); --quick: 400, 200, 64, 32
projections and one PC seed (under 1 min).

1. Samplers. x_T ~ the SDE prior N(0, prior_std^2) (score-SDE's; alpha_T <= 0.007 so its mismatch with
   p_T is far below the noise floor), every fixed-grid sampler at the same NFE budget K (pc: K/2 steps
   of predictor + 1 corrector step), error = sliced W2 to the exact mixture (exact projected quantiles,
   64 directions, 32 with --quick). The sampling-noise floor is the same distance for N exact samples, over 5 seeds
   (mean and min..max). Target: PC with 1000 steps (score-SDE's defaults, NFE 2000) is "within the floor":
   its SW2 averaged over 3 generator seeds <= 1.5 x the mean floor.
2. ODE NFE. The PF-ODE from t_max to eps at rtol = atol = 1e-5 with our dopri5, scipy's RK45
   (solve_ivp on the same right-hand side and state) and torchdiffeq's dopri5. Target: ours <= scipy.
3. Likelihood. bits/dim = -log p / (D ln 2) of P held-out mixture points through the PF-ODE (eps = 1e-5,
   rtol = atol = 1e-5, default prior), exact divergence and Hutchinson (Rademacher, one probe; mean +- its
   standard error), against the exact mixture log-density. Target: exact-divergence VP within 0.01 bits/dim.
The model is the exact mixture denoiser in matmul form (checked against diffusion.gmm's to 1e-10).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import sde  # noqa: E402
from diffusion.gmm import GaussianMixture, random_mixture  # noqa: E402

F64 = torch.float64
F32 = torch.float32  # samplers run in float32 (2.5x faster here; the likelihood runs in float64)
SDES = ["vp", "sub_vp", "ve", "rectified_flow"]
FIXED = ["euler_maruyama", "reverse_diffusion", "ancestral", "pc", "langevin", "annealed_langevin"]


def noise_floor(mix, n, n_proj, seeds=5):
    vals = [mix.sliced_w2(mix.sample(n, torch.Generator().manual_seed(100 + i)), n_proj) for i in range(seeds)]
    return sum(vals) / len(vals), min(vals), max(vals)


def _run(mix, sde_name, sampler, n, seed=1, **kw):
    s = sde.get_sde(sde_name)
    x_T = s.prior_sample((n, mix.dim), generator=torch.Generator().manual_seed(0), dtype=F32)
    return sde.sample(mix.denoiser(s.schedule), x_T, s, sampler=sampler, return_nfe=True,
                      generator=torch.Generator().manual_seed(seed), **kw)


def sampler_table(mix, n, budget, n_proj, seeds=(1, 2, 3)):
    print(f"\n## 1. Samplers at equal NFE = {budget}: sliced W2 ({n_proj} directions) to the exact 32-D mixture, "
          f"{n} samples")
    mean, lo, hi = noise_floor(mix, n, n_proj)
    print(f"sampling-noise floor (exact samples, 5 seeds): mean {mean:.4f}, range {lo:.4f}..{hi:.4f}")
    print("| sampler | steps | NFE | " + " | ".join(SDES) + " |")
    print("|---|---|---|" + "---|" * len(SDES))
    for name in FIXED + ["ode"]:
        steps = None if name == "ode" else budget // 2 if name == "pc" else budget
        cells = []
        for sde_name in SDES:
            x, nfe = _run(mix, sde_name, name, n, **({} if steps is None else {"steps": steps}))
            cells.append(f"{mix.sliced_w2(x, n_proj):.4f}" + (f" ({nfe})" if steps is None else ""))
        label = "ode rtol=atol=1e-5 (NFE)" if steps is None else name
        print(f"| {label} | {steps or '-'} | {'-' if steps is None else nfe} | " + " | ".join(cells) + " |")
    print(f"\nPC with score-SDE's defaults, 1000 steps (NFE 2000), generator seeds {list(seeds)}: SW2 mean (min..max)")
    ratios = {}
    for sde_name in SDES:
        w = [mix.sliced_w2(_run(mix, sde_name, "pc", n, seed=k, steps=1000)[0], n_proj) for k in seeds]
        ratios[sde_name] = sum(w) / len(w) / mean
        print(f"  {sde_name}: {sum(w) / len(w):.4f} ({min(w):.4f}..{max(w):.4f}) = {ratios[sde_name]:.2f} x floor")
    ok = all(r <= 1.5 for r in ratios.values())
    print(f"TARGET pc 1000 steps within the floor (seed-mean SW2 <= 1.5 x floor mean {mean:.4f}) -> "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def ode_nfe_table(mix, n):
    print(f"\n## 2. PF-ODE sampling NFE at rtol = atol = 1e-5 ({n} samples, same x_T and ODE)")
    print("| SDE | ours dopri5 | scipy RK45 | ratio ours/scipy | torchdiffeq dopri5 | max |x_ours - x_scipy| |")
    print("|---|---|---|---|---|---|")
    ok = True
    for sde_name in SDES:
        s = sde.get_sde(sde_name)
        m = mix.denoiser(s.schedule)
        x_T = s.prior_sample((n, mix.dim), generator=torch.Generator().manual_seed(0), dtype=F32)
        res = {meth: sde.sample(m, x_T, s, sampler="ode", method=meth, return_nfe=True)
               for meth in ("dopri5", "RK45", "torchdiffeq_dopri5")}
        (xo, no), (xs, ns), (_, nt) = res["dopri5"], res["RK45"], res["torchdiffeq_dopri5"]
        ok &= no <= ns
        print(f"| {sde_name} | {no} | {ns} | {no / ns:.2f} | {nt} | {(xo - xs).abs().max():.1e} |")
    print(f"TARGET ours <= scipy RK45 NFE on every SDE -> {'PASS' if ok else 'FAIL'}")
    return ok


def likelihood_table(mix, points):
    x = mix.sample(points, torch.Generator().manual_seed(12345))
    d = mix.dim
    ref = float(-mix.log_prob(x).mean() / (d * math.log(2)))
    print(f"\n## 3. PF-ODE likelihood, {points} held-out points: exact bits/dim = {ref:.4f}")
    print("| SDE | divergence | bits/dim | +- s.e. | error | NFE | time s |")
    print("|---|---|---|---|---|---|---|")
    ok = None
    for sde_name in SDES:
        s = sde.get_sde(sde_name)
        m = mix.denoiser(s.schedule)
        for div in ("exact", "hutchinson"):
            t0 = time.perf_counter()
            L = sde.log_likelihood(m, x, s, divergence=div, generator=torch.Generator().manual_seed(0))
            dt = time.perf_counter() - t0
            bpd = float(L.bpd.mean())
            se = float((L.bpd - (-mix.log_prob(x) / (d * math.log(2)))).std() / math.sqrt(points))
            print(f"| {sde_name} | {div} | {bpd:.4f} | {se:.4f} | {bpd - ref:+.5f} | {L.nfe} | {dt:.1f} |")
            if sde_name == "vp" and div == "exact":
                ok = abs(bpd - ref) <= 0.01
    print(f"TARGET VP exact-divergence likelihood within 0.01 bits/dim of exact -> {'PASS' if ok else 'FAIL'}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, < 1 min")
    p.add_argument("--samples", type=int, default=None, help="samples per sampler (default 2000, quick 400)")
    p.add_argument("--nfe", type=int, default=None, help="NFE budget of the fixed-grid samplers (default 1000, quick 200)")
    p.add_argument("--points", type=int, default=None, help="likelihood test points (default 256, quick 64)")
    args = p.parse_args()
    torch.set_num_threads(1)  # small tensors: intra-op threads only add overhead
    n = args.samples or (400 if args.quick else 2000)
    budget = args.nfe or (200 if args.quick else 1000)
    points = args.points or (64 if args.quick else 256)
    mix = random_mixture(32, 16, seed=0)
    t0 = time.perf_counter()
    results = [sampler_table(mix, n, budget, *((32, (1,)) if args.quick else (64, (1, 2, 3)))), ode_nfe_table(mix, min(n, 500)), likelihood_table(mix, points)]
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; targets: {'PASS' if all(results) else 'FAIL'} "
          f"({sum(map(bool, results))}/{len(results)})")


if __name__ == "__main__":
    main()
