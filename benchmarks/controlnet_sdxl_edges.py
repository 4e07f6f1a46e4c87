#!/usr/bin/env python
"""Benchmark: does a short SDXL-ControlNet run learn? Edge F1 of x0-predictions, trained vs untrained ControlNet.

    .venv/bin/python benchmarks/controlnet_sdxl_edges.py [--steps 300] [--lr 3e-3] [--n_eval 32] [--seed 0]

Trains (controlnet.training, the SDXL task) a ControlNet on the tiny random-weight SDXL fixture
(scripts/make_tiny_sdxl.py, --resolution px) with fill data (scripts/make_fill_dataset.py, same size), then scores
held-out fill samples (another seed). The fixture's random VAE decodes any latent to texture (Canny finds edges
everywhere), so its vae/ is replaced by --vae, the shipped default model's trained fill VAE (factor 4, 64 px;
the ControlNet's condition encoder is built for factor 4 and passed as --controlnet_model_name_or_path). The UNet
stays random: what the ControlNet can change is the UNet's prediction. Metric, per held-out sample and timestep n
in --timesteps: x_t from the sample's VAE latents x0 with fixed noise, x0_hat = the controlled UNet's x0-prediction
(diffusion.wrap_model, no CFG), edge F1 (controlnet.canny.edge_f1, tolerance --tolerance px, as
scripts/eval_default.py) between the condition outline and Canny(decode(x0_hat)); also the latent MSE
|x0_hat - x0|^2. Also edge F1 of whole samples (dpmpp_2m, --sample_steps, no CFG; 0 skips them). Printed: means per
row for the untrained ControlNet (zero convolutions: the bare base) and the trained one, their difference, and
the ceiling edge_f1(condition, decode(x0)).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _edges_common import (HEADER_COLUMNS, ceiling_line, fill_data, held_batch, mean_line, parser, row,  # noqa: E402
                           train_config)

import make_tiny_sdxl  # noqa: E402  (scripts/ is on sys.path through _edges_common)

from controlnet import ControlNet  # noqa: E402
from controlnet.canny import edge_f1  # noqa: E402
from controlnet.training import train  # noqa: E402
from controlnet.training_sdxl import sdxl_text_inputs  # noqa: E402
from diffusion.images import to_uint8  # noqa: E402


@torch.no_grad()
def score(pipe, controlnet, batch, timesteps, resolution: int, tolerance: int, sample_steps: int) -> dict:
    """{n: (mean edge F1, mean latent MSE)} of x0-predictions at integer timesteps n (fixed noise per sample), and
    "samples": edge F1 of dpmpp_2m samples (sample_steps, no CFG, seed i for sample i; skipped when 0)."""
    pipe.controlnet = controlnet.eval()
    model_fn = pipe.denoiser(guidance_scale=1.0)
    x0 = pipe.encode_images(batch["pixel_values"], generator=torch.Generator().manual_seed(0))
    ref = list(to_uint8(batch["conditioning_pixel_values"].permute(0, 2, 3, 1)))  # the outlines (white on black)
    ceiling = [edge_f1(r, im, tolerance=tolerance) for r, im in zip(ref, to_uint8(pipe.decode_latents(x0).permute(
        0, 2, 3, 1)))]
    cond = {**sdxl_text_inputs(pipe, list(batch["text"]), resolution),
            "controlnet_cond": batch["conditioning_pixel_values"].to(pipe.dtype)}
    out = {"ceiling": (float(np.mean(ceiling)), 0.0)}
    for n in timesteps:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(n))
        t = pipe.schedule.t_from_timestep(torch.full((x0.shape[0],), n))
        x0_hat, _ = model_fn(pipe.schedule.add_noise(x0, eps, t), t.float(), **cond)
        images = to_uint8(pipe.decode_latents(x0_hat).permute(0, 2, 3, 1))
        f1 = [edge_f1(r, im, tolerance=tolerance) for r, im in zip(ref, images)]
        out[n] = (float(np.mean(f1)), float(((x0_hat - x0) ** 2).mean()))
    if sample_steps:
        images = pipe(list(batch["text"]), batch["conditioning_pixel_values"], sampler="dpmpp_2m", steps=sample_steps,
                      guidance_scale=1.0, seed=0, height=resolution, width=resolution, output_type="np").images
        out["samples"] = (float(np.mean([edge_f1(r, im, tolerance=tolerance)
                                         for r, im in zip(ref, to_uint8(images))])), float("nan"))
    return out


def parse(argv=None):
    p = parser(__doc__, steps=300, lr=3e-3, sample_steps=20, sample_help="sampler steps of the samples row")
    p.add_argument("--timesteps", type=int, nargs="+", default=[250, 500, 750])
    return p.parse_args(argv)


def run(args) -> tuple[dict, dict]:
    """Train as `args` says; (untrained, trained) score() dicts on the held-out fill samples."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_sdxl.make_tiny_sdxl(root / "sdxl", resolution=args.resolution, seed=0)
        shutil.rmtree(model / "vae")
        shutil.copytree(args.vae, model / "vae")
        from diffusers import UNet2DConditionModel

        factor = 2 ** (len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
        hint = (16, 32, 96, 256)[:factor.bit_length()]  # one stride-2 conv per factor 2
        ControlNet.from_unet(UNet2DConditionModel.from_pretrained(model / "unet"),
                             conditioning_embedding_out_channels=hint).save_pretrained(root / "start")
        data, held = fill_data(root, args)
        cfg = train_config(model, data, root, args, controlnet_model_name_or_path=str(root / "start"))
        res = train(cfg)
        rows = (held_batch(cfg, held), args.timesteps, args.resolution, args.tolerance, args.sample_steps)
        before = score(res["pipeline"], ControlNet.from_pretrained(root / "start"), *rows)
        after = score(res["pipeline"], res["controlnet"], *rows)
    return before, after


def main(argv=None):
    args = parse(argv)
    t0 = time.time()
    before, after = run(args)
    print(f"\nSDXL ControlNet, tiny random-weight SDXL fixture at {args.resolution} px, {args.steps} steps x batch "
          f"{args.batch}, lr {args.lr:g}, {args.n_train} training / {args.n_eval} held-out fill samples; "
          f"edge F1 tolerance {args.tolerance} px")
    print(f"{'timestep':>9}{HEADER_COLUMNS}")
    for n in [*args.timesteps, "samples"][:len(args.timesteps) + bool(args.sample_steps)]:
        print(row(str(n), before[n], after[n]))
    print(ceiling_line(before))
    print("(rows: x0-predictions at integer timestep n; samples: dpmpp_2m, no CFG; MSE: latent |x0_hat - x0|^2)")
    print(mean_line(before, after, args.timesteps))
    print(f"total benchmark time {time.time() - t0:.0f} s")
    return before, after


if __name__ == "__main__":
    main()
