#!/usr/bin/env python
"""Train a DiTControlNet on a frozen DiT / MM-DiT from scripts/train_rf_dit.py, with the rectified-flow loss:
the command line of controlnet.dit_training on the shared loop (diffusion.training.loop).

    python scripts/train_dit_controlnet.py --pretrained_model_name_or_path outputs/rf_dit_shapes_mmdit \
        --train_data_dir data/fill16 --resolution 16 [--key=value ...] [--dry-run]
    accelerate launch --multi_gpu --num_processes 2 scripts/train_dit_controlnet.py ...

Flags are diffusers' train_controlnet.py names plus the base's objective (--help lists them); --validation_prompt
and --validation_image take one or more values. Writes output_dir/{config.yaml, metrics.jsonl, logs/,
validation/step-N.png, checkpoint-N/ (accelerate state + controlnet[_ema]/), config.json +
diffusion_pytorch_model.safetensors (the final DiTControlNet), controlnet_ema/}.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlnet.dit_training import TrainDiTControlNetConfig, train  # noqa: E402
from train_controlnet import run  # noqa: E402  (the same CLI: nargs='+' validation flags, errors, exit codes)


def main(argv=None) -> dict:
    return run(TrainDiTControlNetConfig, train, "train_dit_controlnet.py", "DiTControlNet", argv)


if __name__ == "__main__":
    main()
