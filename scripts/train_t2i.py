#!/usr/bin/env python
"""Train a small text-to-image latent diffusion model from scratch into a diffusers Stable Diffusion pipeline
directory: the command line of controlnet.t2i_training on the shared loop (diffusion.training.loop).

    python scripts/make_fill_dataset.py --out data/fill64 --n 6000 --size 64
    python scripts/train_t2i.py --config configs/t2i_fill.yaml [--key=value ...] [--dry-run]

Writes output_dir/{config.yaml, metrics.jsonl, logs/ (trackers), vae_phase/ (the VAE phase's own run: config.yaml,
metrics.jsonl, checkpoint-N/), vae/, validation/step-N.png, checkpoint-N/ (accelerate state + unet_ema/), pipeline/
(StableDiffusionPipeline layout, EMA UNet)}. --resume_from_checkpoint latest continues either phase bit-exactly. Flags: diffusers' example names (--help lists them).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlnet.t2i_training import TrainT2IConfig, train  # noqa: E402
from diffusion.training.config import parse_config  # noqa: E402
from diffusion.training.preflight import cli_errors  # noqa: E402


def main(argv=None) -> dict:
    cfg = parse_config(TrainT2IConfig, argv, prog="train_t2i.py")
    with cli_errors("train_t2i.py"):  # bad input: `error: ...`, exit 2 (as a bad flag); divergence: exit 1
        return train(cfg)


if __name__ == "__main__":
    main()
