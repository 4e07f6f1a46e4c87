"""Which time grid should each sampler get by default? Error vs NFE of every deterministic sampler on every named
grid, on exact-score Gaussian mixtures (diffusion.gmm: all error is the sampler's + grid's) and on the shipped
default model; then the rule of diffusion.timesteps.default_time_grid checked against the best grid.

    python benchmarks/default_grids.py [--quick] [--samples 2000] [--no-model] [--no-plot] [--load JSON] [--write]

The rule (derive) is minimax: per schedule kind, sampler and NFE, the grid with the lowest worst ratio to the best
grid over that kind's problems. --write puts it into diffusion/timesteps.py (DEFAULT_GRIDS is never hand-edited).
HELD_OUT mixtures are swept too but never used to choose; their ratios are printed after.

Error = RMSE of the final samples against a 500-step (model: 200) DPM-Solver++(2M) log-SNR solution of the same x_T (the
probability-flow ODE every deterministic sampler approximates), relative to the reference's RMS; the reference's
own error is printed (500 vs 1000 steps; model 200 vs 400). NFE k runs a 2-evaluations-per-step sampler (heun,
dpm_2, flow_heun) with (k + 1) // 2 steps. The default model (models/default: linear DDPM table, v-prediction) is
measured on its latents, 4 seeds, guidance 3, one fill condition, as docs/examples/compare_samplers.py.

Target (issue 17): without a grid argument, every second-order sampler at 10 and 20 NFE is within 1.2x of its best
grid, on every problem.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from diffusion import VE, Discrete, RectifiedFlow, VPLinear, prior_sample, sample  # noqa: E402
from diffusion.gmm import GaussianMixture, random_mixture, ring_2d  # noqa: E402
from diffusion.samplers import SAMPLERS  # noqa: E402
from diffusion.timesteps import default_time_grid, get_timesteps, schedule_kind  # noqa: E402

OUT_PNG = "outputs/benchmarks/default_grids.png"
SECOND_ORDER = ["heun", "dpm_2", "dpmpp_2m", "dpmpp_3m", "unipc", "lms"]
FIRST_ORDER = ["euler", "ddim"]
GRIDS = ["uniform", "trailing", "log_snr", "karras", "blend", "shifted"]
TARGET_NFES = (10, 20)
REF_STEPS = 500  # mixtures: sharp modes make trajectories near a mode boundary stiff (200 steps: up to 2e-2 off)


def anisotropic(dim: int = 16, k: int = 8, seed: int = 1, log_scales=(0.5, -1.5), decay: float = 0.6,
                std_range=(0.02, 0.1)) -> GaussianMixture:
    """Means with per-axis scales 10^0.5 .. 10^-1.5, small component stds and skewed weights decay^i."""
    g = random_mixture(dim, k, seed=seed, std_range=std_range)
    scales = 10 ** torch.linspace(*log_scales, dim, dtype=torch.float64)
    weights = decay ** torch.arange(k, dtype=torch.float64)
    return GaussianMixture(g.means * scales, g.stds, weights)


PROBLEMS = {
    "2-D ring": lambda: ring_2d(8, 1.0, 0.1),
    "32-D mix": lambda: random_mixture(32, 16, seed=0),
    "16-D aniso": anisotropic,
    "8-D wide": lambda: random_mixture(8, 4, seed=3, spread=3.0, std_range=(0.05, 0.5)),
}
# Held out: other dimensions, anisotropy, weights and stds; measured after the rule is chosen, never used to choose it.
HELD_OUT = {
    "held-out 48-D mix": lambda: random_mixture(48, 24, seed=11, std_range=(0.05, 0.3)),
    "held-out 12-D aniso": lambda: anisotropic(12, 5, seed=7, log_scales=(1.0, -1.0), decay=0.4,
                                               std_range=(0.03, 0.15)),
    "held-out 4-D wide": lambda: random_mixture(4, 3, seed=13, spread=2.0, std_range=(0.2, 0.8)),
}
SCHEDULES = {
    "SD table": lambda: Discrete("scaled_linear"),
    "ZTSNR table": lambda: Discrete("scaled_linear", rescale_betas_zero_snr=True),
    "linear table": lambda: Discrete("linear"),
    "VE": lambda: VE(0.002, 80.0),
    "vp_linear": lambda: VPLinear(),
    "RF": lambda: RectifiedFlow(),
}


def samplers_for(schedule) -> list:
    extra = ["flow_heun"] if isinstance(schedule, RectifiedFlow) else []
    return SECOND_ORDER + extra + FIRST_ORDER


def grids_for(schedule) -> list:
    """Named grids to try: shifted only for rectified flow; trailing only where it differs from uniform."""
    out = [g for g in GRIDS if g != "shifted" or isinstance(schedule, RectifiedFlow)]
    return out if isinstance(schedule, Discrete) else [g for g in out if g != "trailing"]


def steps_for(sampler: str, nfe: int) -> int:
    return (nfe + 1) // 2 if SAMPLERS[sampler].nfe_per_step == 2 else nfe


def grid_of(name: str, schedule, nfe: int, sampler: str):
    """The grid's times; 'trailing' on a continuous schedule is 'uniform'."""
    name = "uniform" if name == "trailing" and not isinstance(schedule, Discrete) else name
    return get_timesteps(name, steps_for(sampler, nfe), schedule)


def rel_rmse(x, ref) -> float:
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def sweep_problem(run, schedule, nfes, samplers, grids):
    """{(sampler, grid, nfe): error} for run(sampler, timesteps) -> error; a failing run counts as inf."""
    out = {}
    for sampler in samplers:
        for grid in grids:
            for nfe in nfes:
                try:
                    err = run(sampler, grid_of(grid, schedule, nfe, sampler))
                except (ValueError, RuntimeError):
                    err = math.inf
                out[sampler, grid, nfe] = err if math.isfinite(err) else math.inf
    return out


def gmm_sweep(nfes, n, threads):
    results = {}
    for pname, make in {**PROBLEMS, **HELD_OUT}.items():
        mix = make()
        for sname, make_schedule in SCHEDULES.items():
            t0 = time.perf_counter()
            schedule = make_schedule()
            fn = mix.denoiser(schedule)
            x_T = prior_sample((n, mix.dim), schedule, 0, dtype=torch.float64)
            ref = sample(fn, x_T, schedule, "dpmpp_2m", steps=REF_STEPS, time_grid="log_snr")
            ref_err = rel_rmse(sample(fn, x_T, schedule, "dpmpp_2m", steps=2 * REF_STEPS, time_grid="log_snr"), ref)
            errs = sweep_problem(lambda s, ts: rel_rmse(sample(fn, x_T, schedule, s, timesteps=ts), ref),
                                 schedule, nfes, samplers_for(schedule), grids_for(schedule))
            results[pname, sname] = (schedule, errs, ref_err)
            print(f"  {pname} / {sname}: reference {REF_STEPS} vs {2 * REF_STEPS} steps {ref_err:.1e} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def model_sweep(nfes, quick):
    """The shipped default model: latents vs a 200-step reference, 4 seeds (1 quick), guidance 3."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from controlnet.cli import load_pipeline
    from diffusion import generators_from_seeds
    from make_fill_dataset import fill_sample

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pipe = load_pipeline(os.path.join(root, "models/default/base"), os.path.join(root, "models/default/controlnet"))
    _, condition, record = fill_sample(np.random.default_rng(2024), 64)
    n_img = 1 if quick else 4

    def latents(sampler, **grid):
        out = pipe(record["prompt"], condition, num_images_per_prompt=n_img, sampler=sampler, guidance_scale=3.0,
                   generator=generators_from_seeds(0, n_img), output_type="latent", **grid)
        return out.images

    t0 = time.perf_counter()
    ref = latents("dpmpp_2m", steps=200, time_grid="log_snr")
    ref_err = rel_rmse(latents("dpmpp_2m", steps=400, time_grid="log_snr"), ref)
    schedule = pipe.schedule
    samplers = ["heun", "dpmpp_2m", "unipc"] if quick else SECOND_ORDER + FIRST_ORDER
    errs = sweep_problem(lambda s, ts: rel_rmse(latents(s, timesteps=ts), ref), schedule, nfes, samplers,
                         grids_for(schedule))
    print(f"  default model: reference 200 vs 400 steps {ref_err:.1e} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return schedule, errs, ref_err


def table(name, schedule, errs, nfes, rule):
    samplers = sorted({s for s, _, _ in errs}, key=lambda s: (s in FIRST_ORDER, s))
    grids = [g for g in GRIDS if any((samplers[0], g, nfes[0]) == k for k in errs)]
    print(f"\n== {name}: relative RMSE vs the 200-step reference; columns grid @ NFE; * = default grid ==")
    print(f"{'sampler':10s}" + "".join(f"{g[:7] + '@' + str(k):>11s}" for g in grids for k in nfes))
    for s in samplers:
        cells = []
        for g in grids:
            for k in nfes:
                mark = "*" if default_time_grid(schedule, s, steps_for(s, k), rule) in (g, "uniform" if g == "trailing"
                                                                                  else g) else " "
                cells.append(f"{errs[s, g, k]:10.4f}{mark}")
        print(f"{s:10s}" + "".join(cells))


def err_of(errs, sampler, grid, nfe) -> float:
    """Error of a grid; 'trailing' off a discrete table is 'uniform', 'shifted' at shift 1 too."""
    for g in (grid, "uniform") if grid in ("trailing", "shifted") else (grid,):
        if (sampler, g, nfe) in errs:
            return errs[sampler, g, nfe]
    return math.inf


def default_error(schedule, errs, sampler, nfe, rule):
    grid = default_time_grid(schedule, sampler, steps_for(sampler, nfe), rule)
    return grid, err_of(errs, sampler, grid, nfe)


def derive(results, nfes):
    """The rule: per schedule kind (diffusion.timesteps.schedule_kind), sampler and NFE, the named grid with the lowest
    worst-case ratio to the best grid over the problems of that kind (minimax; held-out problems excluded), then the
    one over 1.2x on the fewest problems; returned (and printed) as DEFAULT_GRIDS {kind: {sampler: ((fewest steps,
    grid), ...)}}, steps halfway between the measured counts."""
    kinds = {}
    for name, (schedule, errs, _) in results.items():
        if not name.startswith("held-out"):
            kinds.setdefault(schedule_kind(schedule), []).append(errs)
    print("\n== derived rule (minimax: lowest worst ratio to the best grid over the problems of each kind) ==")
    table_out = {}
    for kind, problems in kinds.items():
        samplers = sorted(set.intersection(*({s for s, _, _ in e} for e in problems)))
        print(f'    "{kind}": {{')
        for s in samplers:
            grids = [g for g in GRIDS if all(math.isfinite(err_of(e, s, g, nfes[0])) for e in problems)]
            rule, cells = [], []
            for i, k in enumerate(nfes):
                ratios = {g: [err_of(e, s, g, k) / min(err_of(e, s, h, k) for h in grids) for e in problems]
                          for g in grids}
                worst = {g: max(r) for g, r in ratios.items()}
                over = {g: sum(x > 1.2 for x in r) for g, r in ratios.items()}
                g = min(grids, key=lambda g: (round(worst[g], 2), over[g], g != "trailing"))
                g = "shifted" if kind == "flow" and g in ("trailing", "uniform") else g  # the same grid at shift 1
                cells.append(f"{k}: {g} {worst[g]:.2f}" + (f" ({over[g]} over 1.2x)" if over[g] else ""))
                first = 1 if i == 0 else (steps_for(s, nfes[i - 1]) + steps_for(s, k)) // 2 + 1
                if not rule or rule[-1][1] != g:
                    rule.append((first, g))
            table_out.setdefault(kind, {})[s] = tuple(rule)
            print(f'        "{s}": {tuple(rule)},'.replace("'", '"') + f'  # NFE {"; ".join(cells)}')
        print("    },")
    return table_out


def write_rule(rule, path=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "diffusion", "timesteps.py")):
    """Replace the DEFAULT_GRIDS literal in diffusion/timesteps.py by the derived rule (--write)."""
    src = open(path).read()
    start, end = src.index("DEFAULT_GRIDS: dict = {"), src.index("\nSDE_LIKE = ")
    rows = "".join(f'    "{kind}": {{\n' + "".join(f'        "{s}": {r},\n'.replace("'", '"') for s, r in rows.items())
                   + "    },\n" for kind, rows in rule.items())
    with open(path, "w") as f:
        f.write(src[:start] + "DEFAULT_GRIDS: dict = {\n" + rows + "}" + src[end:])
    print(f"wrote DEFAULT_GRIDS to {path}")


def check_target(results, nfes, rule, held_out=False):
    """Ratio default / best grid for every second-order sampler at 10 and 20 NFE on every problem (the held-out
    problems with held_out=True)."""
    results = {n: v for n, v in results.items() if n.startswith("held-out") == held_out}
    if not results:
        return True
    print(f"\n== target{' on held-out problems' if held_out else ''}: default grid within 1.2x of the best grid, "
          f"second-order samplers, NFE {' / '.join(map(str, TARGET_NFES))} ==")
    print(f"{'problem':32s}{'sampler':10s}" + "".join(f"{'NFE ' + str(k) + ' default (best)':>40s}"
                                                      for k in TARGET_NFES) + "  worst")
    worst_all, fails, pairs = 1.0, 0, 0
    for name, (schedule, errs, _) in results.items():
        for s in sorted({s for s, _, _ in errs}):
            if s in FIRST_ORDER:
                continue
            cells, worst = [], 1.0
            for k in TARGET_NFES:
                if k not in nfes:
                    continue
                grid, err = default_error(schedule, errs, s, k, rule)
                best = min((g for (s2, g, k2) in errs if s2 == s and k2 == k), key=lambda g: errs[s, g, k])
                ratio = err / errs[s, best, k] if errs[s, best, k] > 0 else 1.0
                worst = max(worst, ratio)
                cells.append(f"{grid} {err:.4f} ({best} {errs[s, best, k]:.4f}) {ratio:5.2f}x")
            ok = worst <= 1.2
            fails, pairs = fails + (not ok), pairs + 1
            worst_all = max(worst_all, worst)
            print(f"{name:32s}{s:10s}" + "".join(f"{c:>40s}" for c in cells) + f"  {worst:5.2f}x "
                  f"{'PASS' if ok else 'FAIL'}")
    print(f"{'PASS' if fails == 0 else 'FAIL'} default grid within 1.2x of the best grid: worst ratio "
          f"{worst_all:.2f}x, {fails} of {pairs} (problem, sampler) pairs over 1.2x")
    return fails == 0


def save(results, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {name: {"schedule": type(sch).__name__, "config": sch.config(), "reference_error": ref_err,
                   "errors": [[s, g, k, e if math.isfinite(e) else None] for (s, g, k), e in errs.items()]}
            for name, (sch, errs, ref_err) in results.items()}
    with open(path, "w") as f:
        json.dump(data, f, indent=0)


def load(path):
    from diffusion import schedule as schedules

    out = {}
    for name, d in json.load(open(path)).items():
        sch = getattr(schedules, d["schedule"])(**d["config"])
        errs = {(s, g, k): math.inf if e is None else e for s, g, k, e in d["errors"]}
        out[name] = (sch, errs, d["reference_error"])
    return out


def plot(results, nfes, path, rule):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n.startswith("32-D mix") or n.startswith("default model")]  # a readable subset
    samplers = ["dpmpp_2m", "heun", "unipc"]
    fig, axes = plt.subplots(len(samplers), len(names), figsize=(2.2 * len(names), 2.2 * len(samplers)),
                             squeeze=False, sharex=True)
    for c, name in enumerate(names):
        schedule, errs, ref_err = results[name]
        for r, s in enumerate(samplers):
            ax = axes[r][c]
            for k, g in enumerate(GRIDS):
                if (s, g, nfes[0]) in errs:
                    ax.loglog(nfes, [errs[s, g, n] for n in nfes], "o-", ms=2, lw=1, color=f"C{k}", label=g)
            d = [default_error(schedule, errs, s, n, rule)[1] for n in nfes]
            ax.loglog(nfes, d, "k:", lw=1.5, label="default")
            ax.set_ylim(max(ref_err, 1e-4), 3)
            ax.set_xticks(nfes, [str(n) for n in nfes])
            ax.minorticks_off()
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(name.replace("32-D mix / ", "32-D mixture, ").replace(" (linear table, v)", ""),
                             fontsize=7)
            if c == 0:
                ax.set_ylabel(s, fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("NFE", fontsize=8)
    fig.supylabel("relative RMSE vs 200-step reference", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=70)
    print(f"\nplot: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 problems, 3 schedules, NFE 10 / 20, model on 1 seed")
    p.add_argument("--samples", type=int, default=None, help="x_T per problem (default 2000; quick 256)")
    p.add_argument("--no-model", action="store_true", help="skip the shipped default model")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--load", default=None, help="re-check the rule on the errors a run saved (--save), no sampling")
    p.add_argument("--save", default="outputs/benchmarks/default_grids.json", help="write the measured errors here")
    p.add_argument("--write", action="store_true", help="write the derived rule into diffusion/timesteps.py")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    nfes = (10, 20) if a.quick else (5, 10, 20, 50)
    if a.quick:
        for d, keep in ((PROBLEMS, 2), (HELD_OUT, 1)):
            for k in list(d)[keep:]:
                d.pop(k)
        for k in ("linear table", "vp_linear", "VE"):
            SCHEDULES.pop(k)
    t0 = time.perf_counter()
    if a.load:
        results = load(a.load)
    else:
        print(f"sweep: {len(PROBLEMS)} mixtures (+ {len(HELD_OUT)} held out) x {len(SCHEDULES)} schedules, NFE {nfes}")
        results = {f"{p_} / {s_}": v for (p_, s_), v in gmm_sweep(nfes, a.samples or (256 if a.quick else 2000),
                                                                   a.threads).items()}
        save(results, a.save)
        if not a.no_model:
            results["default model (linear table, v)"] = model_sweep(nfes, a.quick)
            save(results, a.save)
    rule = derive(results, nfes)
    for name, (schedule, errs, _) in results.items():
        table(name, schedule, errs, nfes, rule)
    ok = check_target(results, nfes, rule)
    check_target(results, nfes, rule, held_out=True)
    if a.write:
        write_rule(rule)
    if not a.no_plot:
        plot(results, nfes, OUT_PNG, rule)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return ok


if __name__ == "__main__":
    main()
