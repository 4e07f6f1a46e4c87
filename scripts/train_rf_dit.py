"""Rectified-flow DiT / MM-DiT / SD3-transformer trainer (Esser et al. 2024): the command line of
diffusion.training.rf_dit on the shared loop (diffusion.training.loop).

    accelerate launch scripts/train_rf_dit.py --config configs/rf_dit_digits.yaml [--key=value ...]
    python scripts/train_rf_dit.py --config configs/rf_dit_digits.yaml --max_train_steps 100 --dry-run

Writes output_dir/{config.yaml, metrics.jsonl, logs/ (trackers), validation/step-N.png, checkpoint-N/ (accelerate
state + denoiser[_ema].safetensors with the resolved config in their metadata)}. --resume_from_checkpoint latest
continues bit-exactly. Flags: diffusers' example names (--help lists them).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.training.config import parse_config  # noqa: E402
from diffusion.training.preflight import cli_errors  # noqa: E402
from diffusion.training.rf_dit import TrainConfig, train  # noqa: E402


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, prog="train_rf_dit.py")
    with cli_errors("train_rf_dit.py"):  # bad input: `error: ...`, exit 2 (as a bad flag); divergence: exit 1
        result = train(cfg)
    print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")


if __name__ == "__main__":
    main()
