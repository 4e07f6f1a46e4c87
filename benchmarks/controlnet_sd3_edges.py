#!/usr/bin/env python
"""Benchmark: does a short SD3-ControlNet run learn? Edge F1 of x0-predictions, trained vs untrained ControlNet.

    .venv/bin/python benchmarks/controlnet_sd3_edges.py [--steps 150] [--lr 1e-3] [--n_eval 32] [--seed 0]

Trains (controlnet.training, the SD3 task) an SD3ControlNetModel on a tiny random-weight SD3 base
(scripts/make_tiny_sd3.py) with fill data (scripts/make_fill_dataset.py) at --resolution px, then scores held-out
fill samples (another seed). A random VAE decodes any latent to texture, so the fixture's vae/ is replaced by --vae,
the shipped default model's trained fill VAE (4 latent channels, factor 4), and the transformer is rebuilt with the
same sizes for 4 channels (random weights). What the ControlNet can change is the transformer's velocity. Metric,
per held-out sample and time t in --times: x_t = (1 - t) x0 + t eps (fixed noise), x0_hat = x_t - t v (v from
the frozen transformer with the ControlNet's residuals; conditions VAE-encoded as at sampling), edge F1
(controlnet.canny.edge_f1, as scripts/eval_default.py) between the condition outline and Canny(decode(x0_hat)), and
the latent MSE |x0_hat - x0|^2. Printed per t: untrained ControlNet (zero-initialised: the bare base) vs trained,
the difference, the same for images sampled from noise (flow_euler, no CFG; --sample_steps 0 skips them), and
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

import make_tiny_sd3  # noqa: E402  (scripts/ is on sys.path through _edges_common)

from controlnet.canny import edge_f1  # noqa: E402
from controlnet.pipeline_sd3 import ControlledSD3Transformer  # noqa: E402
from controlnet.training import train  # noqa: E402
from diffusion.images import to_uint8  # noqa: E402


def sd3_base_with_vae(root: Path, vae: Path, resolution: int) -> Path:
    """The tiny SD3 fixture with `vae` in place of its random VAE and a transformer of the same sizes for its
    latent channels and downscale factor."""
    from diffusers import SD3Transformer2DModel

    model = make_tiny_sd3.make_tiny_sd3(root / "sd3", resolution=resolution, seed=0)
    shutil.rmtree(model / "vae")
    shutil.copytree(vae, model / "vae")
    v = json.loads((model / "vae" / "config.json").read_text())
    side = resolution // 2 ** (len(v["block_out_channels"]) - 1)
    cfg = dict(SD3Transformer2DModel.load_config(model / "transformer"))
    cfg.update(in_channels=v["latent_channels"], out_channels=v["latent_channels"], sample_size=side,
               pos_embed_max_size=side)
    torch.manual_seed(0)
    SD3Transformer2DModel.from_config(cfg).save_pretrained(model / "transformer")
    return model


@torch.no_grad()
def score(pipe, controlnet, batch, times, tolerance: int) -> dict:
    """{t: (mean edge F1, mean latent MSE)} of x0-predictions at times t (fixed noise and condition posterior)."""
    net = ControlledSD3Transformer(pipe.transformer, controlnet.eval())
    x0 = pipe.encode_images(batch["pixel_values"], generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_condition(batch["conditioning_pixel_values"], controlnet, torch.Generator().manual_seed(1))
    states, pooled = pipe.encode_prompt(list(batch["text"]), 77)
    ref = list(to_uint8(batch["conditioning_pixel_values"].permute(0, 2, 3, 1)))  # the outlines (white on black)
    decoded = to_uint8(pipe.decode_latents(x0).permute(0, 2, 3, 1))
    out = {"ceiling": (float(np.mean([edge_f1(r, im, tolerance=tolerance) for r, im in zip(ref, decoded)])), 0.0)}
    for k, t in enumerate(times):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + k))
        x_t = (1 - t) * x0 + t * eps
        v = net(x_t, torch.full((x0.shape[0],), 1000.0 * t), states, pooled, controlnet_cond=cond)
        x0_hat = x_t - t * v
        images = to_uint8(pipe.decode_latents(x0_hat).permute(0, 2, 3, 1))
        f1 = [edge_f1(r, im, tolerance=tolerance) for r, im in zip(ref, images)]
        out[t] = (float(np.mean(f1)), float(((x0_hat - x0) ** 2).mean()))
    return out


@torch.no_grad()
def score_samples(pipe, controlnet, batch, steps: int, tolerance: int) -> float:
    """Mean edge F1 of images sampled (flow_euler, `steps` steps, no CFG, seed = index) from each held-out prompt
    and condition."""
    pipe.controlnet = controlnet.eval()
    conds = batch["conditioning_pixel_values"]
    ref = list(to_uint8(conds.permute(0, 2, 3, 1)))
    images = pipe(list(batch["text"]), conds, steps=steps, sampler="flow_euler", guidance_scale=1.0,
                  height=conds.shape[-2], width=conds.shape[-1], seed=list(range(len(ref))), output_type="np").images
    return float(np.mean([edge_f1(r, to_uint8(im), tolerance=tolerance) for r, im in zip(ref, images)]))


def parse(argv=None):
    p = parser(__doc__, steps=150, lr=1e-3, sample_steps=10, sample_help="sampler steps for the 'sampled' row")
    p.add_argument("--times", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--weighting_scheme", default="logit_normal")
    return p.parse_args(argv)


def run(args) -> tuple[dict, dict, list]:
    """Train as `args` says; (untrained, trained) score() dicts on the held-out fill samples and the two
    score_samples() values (empty when --sample_steps is 0)."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = sd3_base_with_vae(root, Path(args.vae), args.resolution)
        data, held = fill_data(root, args)
        cfg = train_config(model, data, root, args, weighting_scheme=args.weighting_scheme)
        res = train(cfg)
        pipe, trained = res["pipeline"], res["controlnet"]
        untrained = type(trained).from_transformer(pipe.transformer, num_layers=trained.config.num_layers,
                                                   num_extra_conditioning_channels=0)
        batch = held_batch(cfg, held)
        before = score(pipe, untrained, batch, args.times, args.tolerance)
        after = score(pipe, trained, batch, args.times, args.tolerance)
        sampled = [score_samples(pipe, net, batch, args.sample_steps, args.tolerance)
                   for net in (untrained, trained)] if args.sample_steps else []
    return before, after, sampled


def main(argv=None):
    args = parse(argv)
    t0 = time.time()
    before, after, sampled = run(args)
    print(f"\nSD3 ControlNet, tiny random-weight SD3 base with the fill VAE at {args.resolution} px, {args.steps} "
          f"steps x batch {args.batch}, lr {args.lr:g}, {args.weighting_scheme}, {args.n_train} training / "
          f"{args.n_eval} held-out fill samples; edge F1 tolerance {args.tolerance} px")
    print(f"{'t':>9}{HEADER_COLUMNS}")
    for t in args.times:
        print(row(f"{t:.2f}", before[t], after[t]))
    if sampled:
        print(f"{'sampled':>9}{sampled[0]:>14.3f}{sampled[1]:>12.3f}{sampled[1] - sampled[0]:>+8.3f}   (images from "
              f"noise: flow_euler, {args.sample_steps} steps, no CFG)")
    print(ceiling_line(before))
    print(mean_line(before, after, args.times))
    print(f"total benchmark time {time.time() - t0:.0f} s")
    return before, after


if __name__ == "__main__":
    main()
