"""Shared setup of the ControlNet edge-F1 benchmarks (controlnet_sdxl_edges.py, controlnet_sd3_edges.py): flags,
fill data, training config, held-out batch and the printed table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "scripts")) if p not in sys.path]

import make_fill_dataset  # noqa: E402

from controlnet.data import collate  # noqa: E402
from controlnet.training import TrainControlNetConfig, build_dataset  # noqa: E402

HEADER_COLUMNS = f"{'F1 untrained':>14}{'F1 trained':>12}{'dF1':>8}{'MSE untrained':>15}{'MSE trained':>13}"


def parser(doc: str, steps: int, lr: float, sample_steps: int, sample_help: str) -> argparse.ArgumentParser:
    """The flags both benchmarks share (their defaults differ only in steps, lr and sampler steps)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--resolution", type=int, default=64, help="fixture and data size (px)")
    p.add_argument("--vae", default=str(ROOT / "models" / "default" / "base" / "vae"),
                   help="trained AutoencoderKL dir replacing the fixture's random vae/")
    p.add_argument("--n_train", type=int, default=256)
    p.add_argument("--n_eval", type=int, default=32)
    p.add_argument("--sample_steps", type=int, default=sample_steps, help=sample_help + " (0: skip that row)")
    p.add_argument("--tolerance", type=int, default=2, help="edge match distance (px)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order, noise, timesteps)")
    p.add_argument("--threads", type=int, default=1)
    return p


def fill_data(root: Path, args) -> tuple[Path, Path]:
    """Training (seed 0) and held-out (seed 1) fill datasets at args.resolution px."""
    return (make_fill_dataset.write_fill_dataset(root / "train", args.n_train, args.resolution, seed=0),
            make_fill_dataset.write_fill_dataset(root / "eval", args.n_eval, args.resolution, seed=1))


def train_config(model: Path, data: Path, root: Path, args, **extra) -> TrainControlNetConfig:
    """The short run's config: constant lr (no warm-up), one checkpoint at the end, no progress bar."""
    return TrainControlNetConfig(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(root / "run"),
        resolution=args.resolution, train_batch_size=args.batch, learning_rate=args.lr, lr_warmup_steps=0,
        max_train_steps=args.steps, checkpointing_steps=args.steps, report_to="none", progress_bar=False,
        logging_steps=max(1, args.steps // 5), seed=args.seed, **extra)


def held_batch(cfg: TrainControlNetConfig, held: Path) -> dict:
    """All held-out samples as one batch, preprocessed as in training."""
    ds = build_dataset(TrainControlNetConfig(**{**cfg.__dict__, "train_data_dir": str(held)}))
    return collate([ds[i] for i in range(len(ds))])


def row(label: str, before: tuple, after: tuple) -> str:
    (f_b, m_b), (f_a, m_a) = before, after
    return f"{label:>9}{f_b:>14.3f}{f_a:>12.3f}{f_a - f_b:>+8.3f}{m_b:>15.3f}{m_a:>13.3f}"


def ceiling_line(before: dict) -> str:
    return f"{'ceiling':>9}{before['ceiling'][0]:>14.3f}   (edge F1 of decode(x0): the VAE's reconstruction)"


def mean_line(before: dict, after: dict, keys) -> str:
    mean_b, mean_a = (np.mean([s[k][0] for k in keys]) for s in (before, after))
    return f"{'mean':>9}{mean_b:>14.3f}{mean_a:>12.3f}{mean_a - mean_b:>+8.3f}"
