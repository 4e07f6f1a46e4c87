"""Validation grids: tensors -> one uint8 image, written to output_dir/validation/step-N.png and to the trackers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion.images import image_grid


def make_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', 3) grid with nrow images per row (diffusion.images.image_grid)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    tiles = list(x.permute(0, 2, 3, 1).numpy())
    return image_grid([tiles[i:i + nrow] for i in range(0, len(tiles), nrow)], pad=pad, border=pad)


def log_grid(accelerator, grid: np.ndarray, out_dir, step: int, tag: str = "validation") -> Path:
    """Save the grid as output_dir/validation/step-N.png and log it to every tracker accelerate runs."""
    from PIL import Image

    path = Path(out_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid)]}, step=step)
    return path
