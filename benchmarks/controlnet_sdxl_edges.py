#!/usr/bin/env python
"""Benchmark: does a short SDXL-ControlNet run learn? Edge F1 of x0-predictions, trained vs untrained ControlNet.

    .venv/bin/python benchmarks/controlnet_sdxl_edges.py [--steps 300] [--lr 3e-3] [--n_train 256] [--n_eval 32]

Trains (controlnet.training, the SDXL task) a ControlNet on the tiny random-weight SDXL fixture
(scripts/make_tiny_sdxl.py, --resolution px) with fill data (scripts/make_fill_dataset.py, same size), then scores
held-out fill samples (another seed). The fixture's random VAE decodes any latent to texture (Canny finds edges
everywhere), so its vae/ is replaced by --vae, the shipped default model's trained fill VAE (factor 4, 64 px;
the ControlNet's condition encoder is built for factor 4 and passed as --controlnet_model_name_or_path). The UNet
stays random: what the ControlNet can change is the UNet's prediction. Metric, per held-out sample and timestep n
in --timesteps: x_t from the sample's VAE latents x0 with fixed noise, x0_hat = the controlled UNet's x0-prediction
(diffusion.wrap_model, no CFG), edge F1 (controlnet.canny.edge_f1, tolerance --tolerance px, as
scripts/eval_default.py) between the condition outline and Canny(decode(x0_hat)); also the latent MSE
|x0_hat - x0|^2. Also edge F1 of whole samples (dpmpp_2m, --sample_steps, no CFG). Printed: means per
row for the untrained ControlNet (zero convolutions: the bare base) and the trained one, their difference, and
the ceiling edge_f1(condition, decode(x0)).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import make_fill_dataset  # noqa: E402
import make_tiny_sdxl  # noqa: E402

from controlnet import ControlNet  # noqa: E402
from controlnet.canny import edge_f1  # noqa: E402
from controlnet.data import collate  # noqa: E402
from controlnet.training import TrainControlNetConfig, build_dataset, train  # noqa: E402
from controlnet.training_sdxl import sdxl_text_inputs  # noqa: E402
from diffusion.images import to_uint8  # noqa: E402


@torch.no_grad()
def score(pipe, controlnet, batch, timesteps, resolution: int, tolerance: int, sample_steps: int) -> dict:
    """{n: (mean edge F1, mean latent MSE)} of x0-predictions at integer timesteps n (fixed noise per sample), and
    "samples": edge F1 of dpmpp_2m samples (sample_steps, no CFG, seed i for sample i)."""
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
    images = pipe(list(batch["text"]), batch["conditioning_pixel_values"], sampler="dpmpp_2m", steps=sample_steps,
                  guidance_scale=1.0, seed=0, height=resolution, width=resolution, output_type="np").images
    out["samples"] = (float(np.mean([edge_f1(r, im, tolerance=tolerance) for r, im in zip(ref, to_uint8(images))])),
                      float("nan"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--resolution", type=int, default=64, help="fixture and data size (px)")
    p.add_argument("--vae", default=str(Path(__file__).resolve().parents[1] / "models" / "default" / "base" / "vae"),
                   help="trained AutoencoderKL dir replacing the fixture's random vae/")
    p.add_argument("--n_train", type=int, default=256)
    p.add_argument("--n_eval", type=int, default=32)
    p.add_argument("--timesteps", type=int, nargs="+", default=[250, 500, 750])
    p.add_argument("--sample_steps", type=int, default=20, help="sampler steps of the samples row")
    p.add_argument("--tolerance", type=int, default=2, help="edge match distance (px)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
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
        data = make_fill_dataset.write_fill_dataset(root / "train", args.n_train, args.resolution, seed=0)
        held = make_fill_dataset.write_fill_dataset(root / "eval", args.n_eval, args.resolution, seed=1)
        cfg = TrainControlNetConfig(
            pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(root / "run"),
            controlnet_model_name_or_path=str(root / "start"),
            resolution=args.resolution, train_batch_size=args.batch, learning_rate=args.lr, lr_warmup_steps=0,
            max_train_steps=args.steps, checkpointing_steps=args.steps, report_to="none", progress_bar=False,
            logging_steps=max(1, args.steps // 5))
        res = train(cfg)
        pipe = res["pipeline"]
        eval_cfg = TrainControlNetConfig(**{**cfg.__dict__, "train_data_dir": str(held)})
        ds = build_dataset(eval_cfg)
        batch = collate([ds[i] for i in range(len(ds))])
        rows = (batch, args.timesteps, args.resolution, args.tolerance, args.sample_steps)
        before = score(pipe, ControlNet.from_pretrained(root / "start"), *rows)
        after = score(pipe, res["controlnet"], *rows)
    print(f"\nSDXL ControlNet, tiny random-weight SDXL fixture at {args.resolution} px, {args.steps} steps x batch "
          f"{args.batch}, lr {args.lr:g}, {args.n_train} training / {args.n_eval} held-out fill samples; "
          f"edge F1 tolerance {args.tolerance} px")
    print(f"{'timestep':>9}{'F1 untrained':>14}{'F1 trained':>12}{'dF1':>8}{'MSE untrained':>15}{'MSE trained':>13}")
    for n in [*args.timesteps, "samples"]:
        (f_b, m_b), (f_a, m_a) = before[n], after[n]
        print(f"{n:>9}{f_b:>14.3f}{f_a:>12.3f}{f_a - f_b:>+8.3f}{m_b:>15.3f}{m_a:>13.3f}")
    print(f"{'ceiling':>9}{before['ceiling'][0]:>14.3f}   (edge F1 of decode(x0): the VAE's reconstruction)")
    print("(rows: x0-predictions at integer timestep n; samples: dpmpp_2m, no CFG; MSE: latent |x0_hat - x0|^2)")
    mean_b = np.mean([before[n][0] for n in args.timesteps])
    mean_a = np.mean([after[n][0] for n in args.timesteps])
    print(f"{'mean':>9}{mean_b:>14.3f}{mean_a:>12.3f}{mean_a - mean_b:>+8.3f}")
    print(f"total benchmark time {time.time() - t0:.0f} s")
    return before, after


if __name__ == "__main__":
    main()
