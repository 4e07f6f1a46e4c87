#!/usr/bin/env python
"""Synthetic fill50k-style ControlNet data (Zhang et al. 2023's toy "fill" task): filled circles, outline conditions.

    python scripts/make_fill_dataset.py --out data/fill --n 1000 --size 64 --seed 0 [--format both]

Writes the ControlNet fill50k layout
    OUT/source/<i>.png   condition: the circle outline, white (255) edges on black (like a canny map)
    OUT/target/<i>.png   image: a filled circle of one palette colour on a background of another
    OUT/prompt.json      one JSON object a line: {"source": "source/<i>.png", "target": "target/<i>.png",
                         "prompt": "red circle with blue background", plus the checkable ground truth:
                         "circle_color", "background_color", "center" [x, y], "radius" (pixels)}
and with --format imagefolder|both the Hugging Face imagefolder form
    OUT/metadata.jsonl   {"file_name": "target/<i>.png", "conditioning_image": "source/<i>.png", "text": ...}
Colours come from the fixed named PALETTE (diffusion.models.tokenizer, the fixtures' vocabulary), so a generated
image's colours can be checked against its prompt.
Deterministic: the same --seed, --n and --size give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: diffusion
from diffusion.models.tokenizer import PALETTE, PROMPT_WORDS  # noqa: E402,F401  (the fill vocabulary lives there)


def prompt_for(circle: str, background: str) -> str:
    return f"{circle} circle with {background} background"


def fill_sample(rng: np.random.Generator, size: int, palette: dict = PALETTE):
    """One sample: (target HxWx3 uint8, source HxWx3 uint8 in {0,255}, record dict) drawn from `rng`."""
    names = list(palette)
    ci, bi = rng.choice(len(names), size=2, replace=False)  # circle and background always differ
    circle, background = names[ci], names[bi]
    r_min, r_max = max(2, size // 10), max(3, size * 2 // 5)
    radius = int(rng.integers(r_min, r_max + 1))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2, endpoint=True))  # circle fully inside
    target = np.empty((size, size, 3), np.uint8)
    target[:] = palette[background]
    cv2.circle(target, (cx, cy), radius, tuple(int(c) for c in palette[circle]), thickness=-1, lineType=cv2.LINE_8)
    source = np.zeros((size, size, 3), np.uint8)
    cv2.circle(source, (cx, cy), radius, (255, 255, 255), thickness=max(1, round(size / 128)), lineType=cv2.LINE_8)
    record = {"prompt": prompt_for(circle, background), "circle_color": circle, "background_color": background,
              "center": [cx, cy], "radius": radius}
    return target, source, record


def _write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def write_fill_dataset(out, n: int, size: int = 64, seed: int = 0, fmt: str = "fill50k") -> Path:
    """Write `n` samples to `out` in the fill50k layout (and/or imagefolder metadata); returns `out`."""
    if fmt not in ("fill50k", "imagefolder", "both"):
        raise ValueError(f"format must be one of fill50k, imagefolder, both; got {fmt!r}")
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out)
    (out / "source").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fill_lines, meta_lines = [], []
    for i in range(n):
        target, source, rec = fill_sample(rng, size)
        src, tgt = f"source/{i}.png", f"target/{i}.png"
        _write_png(out / src, source)
        _write_png(out / tgt, target)
        fill_lines.append(json.dumps({"source": src, "target": tgt, **rec}))
        meta_lines.append(json.dumps({"file_name": tgt, "conditioning_image": src, "text": rec["prompt"]}))
    if fmt in ("fill50k", "both"):
        (out / "prompt.json").write_text("\n".join(fill_lines) + "\n")
    if fmt in ("imagefolder", "both"):
        (out / "metadata.jsonl").write_text("\n".join(meta_lines) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (square)")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is a pure function of it)")
    p.add_argument("--format", dest="fmt", default="fill50k", choices=["fill50k", "imagefolder", "both"],
                   help="fill50k: prompt.json; imagefolder: metadata.jsonl; both: both index files")
    a = p.parse_args(argv)
    out = write_fill_dataset(a.out, a.n, a.size, a.seed, a.fmt)
    print(f"wrote {a.n} samples ({a.size}x{a.size}, format {a.fmt}) to {out}")


if __name__ == "__main__":
    main()
