#!/usr/bin/env python
"""Evaluate a base + ControlNet pair (default: the shipped models/default) on held-out fill conditions.

    python scripts/eval_default.py [--n 256] [--data_seed 1000] [--steps 20] [--sampler dpmpp_2m]

Held-out conditions come from scripts/make_fill_dataset.py's generator with a seed the training data did not use.
Edge fidelity: controlnet.canny.edge_f1 between the condition outline and Canny(generated image) (Zhang et al.
2023 use edge-map agreement for canny ControlNets); the same score of the true target image is printed as the
ceiling (Canny finds no edge between colours of near-equal luminance, e.g. red on blue). Colour: the mean RGB of
the circle interior / background (2 px away from the outline) of each generated image is classified to the
nearest colour of the named PALETTE and compared with the colours the prompt asked for.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_fill_dataset import PALETTE, fill_sample  # noqa: E402

NAMES = list(PALETTE)
COLORS = np.array([PALETTE[n] for n in NAMES], dtype=np.float64)


def region_masks(size: int, center, radius: int, margin: int = 2):
    """(circle interior, background) boolean masks at least `margin` px from the circle's outline."""
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(xx - center[0], yy - center[1])
    return d <= radius - margin, d >= radius + margin


def classify(rgb_mean) -> str:
    """Nearest palette colour name (Euclidean RGB)."""
    return NAMES[int(np.argmin(((COLORS - np.asarray(rgb_mean, np.float64)) ** 2).sum(1)))]


def held_out(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    return [fill_sample(rng, size) for _ in range(n)]


def score(image: np.ndarray, source: np.ndarray, rec: dict) -> dict:
    """Edge F1 and colour classification of one generated HxWx3 uint8 image."""
    from controlnet.canny import edge_f1

    inside, outside = region_masks(image.shape[0], rec["center"], rec["radius"])
    circle = classify(image[inside].mean(0)) if inside.any() else None
    background = classify(image[outside].mean(0))
    ok_c = circle is None or circle == rec["circle_color"]
    ok_b = background == rec["background_color"]
    return {"edge_f1": edge_f1(source, image), "circle": circle, "background": background, "circle_ok": ok_c,
            "background_ok": ok_b, "both_ok": ok_c and ok_b}


def evaluate(pipe, n: int = 64, data_seed: int = 1000, size: int = 64, seed: int = 0, batch: int = 16,
             sampler: str = "dpmpp_2m", steps: int = 20, guidance_scale: float = 3.0,
             conditioning_scale: float = 1.0, time_grid: str | None = None) -> dict:
    """Generate one image per held-out condition (seed + i) and score them; returns summary + per-sample rows."""
    from controlnet.canny import edge_f1
    from diffusion import generators_from_seeds
    from diffusion.images import to_uint8

    data = held_out(n, size, data_seed)
    rows, images = [], []
    for lo in range(0, n, batch):
        chunk = data[lo:lo + batch]
        imgs = pipe([r["prompt"] for _, _, r in chunk], [s for _, s, _ in chunk], height=size, width=size,
                    sampler=sampler, steps=steps, time_grid=time_grid, guidance_scale=guidance_scale,
                    controlnet_conditioning_scale=conditioning_scale,
                    generator=generators_from_seeds(seed + lo, len(chunk)), output_type="np").images
        for (target, source, rec), im in zip(chunk, imgs):
            im = to_uint8(im)
            images.append(im)
            rows.append({**score(im, source, rec), "edge_f1_target": edge_f1(source, target),
                         "prompt": rec["prompt"]})
    f1 = np.array([r["edge_f1"] for r in rows])
    f1_gt = np.array([r["edge_f1_target"] for r in rows])
    visible = f1_gt > 0
    summary = {
        "n": n, "edge_f1": float(f1.mean()), "edge_f1_target_ceiling": float(f1_gt.mean()),
        "edge_f1_where_target_has_edges": float(f1[visible].mean()) if visible.any() else float("nan"),
        "circle_color_acc": float(np.mean([r["circle_ok"] for r in rows])),
        "background_color_acc": float(np.mean([r["background_ok"] for r in rows])),
        "both_colors_acc": float(np.mean([r["both_ok"] for r in rows])),
    }
    return {"summary": summary, "rows": rows, "images": images, "data": data}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models/default/base"), help="base pipeline directory")
    p.add_argument("--controlnet", default=str(ROOT / "models/default/controlnet"), help="ControlNet directory")
    p.add_argument("--n", type=int, default=256, help="held-out conditions")
    p.add_argument("--data_seed", type=int, default=1000, help="seed of the held-out conditions (training used 0)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--time_grid", default=None, help="diffusion.TIME_GRIDS name (default: the sampler default)")
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--conditioning_scale", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grid", default="outputs/eval_default.png", help="grid of (condition, sample) pairs")
    p.add_argument("--json", default=None, help="also write the summary here")
    a = p.parse_args(argv)

    import torch
    from PIL import Image

    from controlnet.cli import load_pipeline, model_configs
    from diffusion.images import image_grid

    torch.set_num_threads(a.threads)
    model_configs(a.model, a.controlnet)  # clear error for a mismatched pair
    t0 = time.time()
    res = evaluate(load_pipeline(a.model, a.controlnet), a.n, a.data_seed, seed=a.seed, batch=a.batch,
                   sampler=a.sampler, steps=a.steps, guidance_scale=a.guidance_scale,
                   conditioning_scale=a.conditioning_scale, time_grid=a.time_grid)
    s = res["summary"]
    print(f"held-out fill conditions: {s['n']} (data seed {a.data_seed}), {a.sampler} {a.steps} steps "
          f"({a.time_grid or 'default'} grid), guidance {a.guidance_scale}, {time.time() - t0:.0f} s")
    print(f"{'metric':<44}{'value':>8}{'target':>9}")
    for key, label, target in [
            ("edge_f1", "edge F1 (condition vs Canny(sample))", ">= 0.60"),
            ("edge_f1_target_ceiling", "  same score of the true target images", ""),
            ("edge_f1_where_target_has_edges", "  edge F1 where the target has Canny edges", ""),
            ("both_colors_acc", "requested colours correct (circle and bg)", ">= 0.80"),
            ("circle_color_acc", "  circle colour correct", ""),
            ("background_color_acc", "  background colour correct", "")]:
        print(f"{label:<44}{s[key]:>8.3f}{target:>9}")
    rows = [[src, im] for (_, src, _), im in zip(res["data"][:16], res["images"][:16])]
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        pairs = [sum(rows[i:i + 4], []) for i in range(0, len(rows), 4)]
        Image.fromarray(image_grid(pairs)).save(a.grid)
        print(f"grid (condition, sample) x 4 per row: {a.grid}")
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    return s


if __name__ == "__main__":
    main()
