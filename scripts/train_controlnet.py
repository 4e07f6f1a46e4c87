#!/usr/bin/env python
"""Train a ControlNet (Zhang, Rao & Agrawala 2023) on a frozen local Stable Diffusion pipeline directory.

    python scripts/train_controlnet.py --config configs/controlnet_fill_tiny.yaml [--key=value ...] [--dry-run]
    accelerate launch --multi_gpu --num_processes 2 scripts/train_controlnet.py --config ...

The base's family (model_index.json: SD 1.x / 2.x, SDXL, SD3) picks the task (controlnet.training.task_for); flags
marked "(SDXL only)" / "(SD3 only)" in --help follow diffusers' train_controlnet_sdxl.py / train_controlnet_sd3.py.
Arguments follow the diffusers train_controlnet.py example (see --help); --validation_prompt and
--validation_image take one or more values. Writes output_dir/{config.yaml, metrics.jsonl, logs/ (TensorBoard),
validation/step-<k>.png, checkpoint-<step>/ (accelerate state + controlnet/), config.json +
diffusion_pytorch_model.safetensors (the final ControlNet, diffusers format)}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlnet.training import TrainControlNetConfig, train  # noqa: E402
from diffusion.training.config import parse_config  # noqa: E402
from diffusion.training.preflight import cli_errors  # noqa: E402

LIST_FLAGS = ("validation_prompt", "validation_image")


def gather_list_flags(argv: list[str]) -> list[str]:
    """diffusers-style `--validation_prompt a b c` (nargs='+') -> one JSON-list value, so commas stay in prompts."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].replace("-", "_") if arg.startswith("--") else None
        if key in LIST_FLAGS:
            vals, i = [], i + 1
            while i < len(argv) and not argv[i].startswith("--"):
                vals.append(argv[i])
                i += 1
            out.append(f"--{key}={json.dumps(vals)}")
            continue
        if key and "=" in key and key.split("=", 1)[0] in LIST_FLAGS and not key.split("=", 1)[1].startswith("["):
            k, v = arg[2:].split("=", 1)
            out.append(f"--{k}={json.dumps([v])}")
        else:
            out.append(arg)
        i += 1
    return out


def run(config_cls, train_fn, prog: str, what: str, argv=None) -> dict:
    """Parse (diffusers-style list flags gathered), train with clear errors (bad input: `error: ...`, exit 2 as a bad
    flag; divergence: exit 1), say where the result is."""
    argv = gather_list_flags(sys.argv[1:] if argv is None else list(argv))
    cfg = parse_config(config_cls, argv, prog=prog)
    with cli_errors(prog):
        result = train_fn(cfg)
    if result["main"]:
        print(f"done: step {result['step']}, {what} saved to {cfg.output_dir}")
    return result


def main(argv=None) -> dict:
    return run(TrainControlNetConfig, train, "train_controlnet.py", "ControlNet", argv)

if __name__ == "__main__":
    main()
