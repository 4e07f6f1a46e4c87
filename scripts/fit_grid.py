#!/usr/bin/env python
"""Fit a sampler's time grid to the shipped default model (diffusion.optimize_timesteps) and write it as JSON.

    python scripts/fit_grid.py --steps 5 10 [--eval_n 32]       # writes outputs/grids/dpmpp_2m_{5,10}.json
    cn-sample --condition edges.png --prompt "..." --time_grid outputs/grids/dpmpp_2m_10.json

Fitting set: --n fill conditions (scripts/make_fill_dataset.py generator, --data_seed; training used 0, eval 1000)
with prior noise seeds --seed + i. --eval_n prints the latent RMSE to a 200-step reference on held-out conditions
and seeds (--eval_data_seed, --eval_seed) of the fitted grid and of every named grid.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


def problem(pipe, n: int, data_seed: int, seed: int, guidance_scale: float, size: int = 64):
    """model_fn, cond and x_T for n fill conditions, as ControlNetPipeline.__call__ builds them."""
    from eval_default import held_out

    from diffusion import prior_sample

    data = held_out(n, size, data_seed)
    cond = {"encoder_hidden_states": pipe.encode_prompt([r["prompt"] for _, _, r in data]),
            "controlnet_cond": pipe.prepare_condition([s for _, s, _ in data], n, size, size)}
    shape = (n, pipe.unet.config.in_channels, size // pipe.vae_scale, size // pipe.vae_scale)
    return pipe.denoiser(guidance_scale, pipe.encode_prompt([""] * n)), cond, prior_sample(shape, pipe.schedule, seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models/default/base"))
    p.add_argument("--controlnet", default=str(ROOT / "models/default/controlnet"))
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, nargs="+", default=[10], help="one grid per value")
    p.add_argument("--n", type=int, default=32, help="fitting conditions / seeds")
    for flag, default in (("data_seed", 2000), ("seed", 0), ("eval_n", 0), ("eval_data_seed", 1000),
                          ("eval_seed", 100), ("reference_steps", 50), ("max_evals", 100), ("threads", 2)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--out_dir", default=str(ROOT / "outputs/grids"), help="writes <sampler>_<steps>.json here")
    a = p.parse_args(argv)

    import torch

    from controlnet.cli import load_pipeline
    from diffusion import optimize_timesteps, sample
    from diffusion.fitted_grid import named_grids, reference_solution, rmse

    torch.set_num_threads(a.threads)
    pipe, fits = load_pipeline(a.model, a.controlnet), {}
    with torch.no_grad():
        model_fn, cond, x_T = problem(pipe, a.n, a.data_seed, a.seed, a.guidance_scale)
        ref = reference_solution(model_fn, pipe.schedule, x_T, a.reference_steps, cond)
        for steps in a.steps:
            fit = fits[steps] = optimize_timesteps(model_fn, pipe.schedule, a.sampler, steps, x_T, cond=cond,
                                                   reference=ref, max_evals=a.max_evals, progress=True)
            fit.fitted_on.update(reference=f"dpmpp_2m, log_snr grid, {a.reference_steps} steps", model=a.model,
                                 controlnet=a.controlnet, data_seed=a.data_seed, seed=a.seed, guidance=a.guidance_scale)
            out, f = fit.save(Path(a.out_dir) / f"{a.sampler}_{steps}.json"), fit.fitted_on
            print(f"{a.sampler} {steps} steps, {a.n} conditions, {f['seconds']:.0f} s, {f['evals']} runs: RMSE "
                  f"{f['rmse_init']:.4f} ({f['init']}) -> {f['rmse']:.4f}; t = "
                  f"{[round(float(t), 4) for t in fit.timesteps]}; wrote {out}")
        if a.eval_n:
            model_fn, cond, x_T = problem(pipe, a.eval_n, a.eval_data_seed, a.eval_seed, a.guidance_scale)
            ref = reference_solution(model_fn, pipe.schedule, x_T, 200, cond)
            print(f"held-out: {a.eval_n} conditions (data seed {a.eval_data_seed}), seeds {a.eval_seed}+i; latent "
                  f"RMSE to a 200-step reference (latent RMS {rmse(ref, torch.zeros(())):.3f})")
            for steps, fit in fits.items():
                errs = {k: rmse(sample(model_fn, x_T, pipe.schedule, a.sampler, timesteps=ts, cond=cond), ref)
                        for k, ts in {"fitted": fit.timesteps, **named_grids(pipe.schedule, steps)}.items()}
                ranked = sorted(errs.items(), key=lambda kv: kv[1])
                print(f"  {steps} steps: " + ", ".join(f"{k} {e:.4f}" for k, e in ranked))


if __name__ == "__main__":
    main()
