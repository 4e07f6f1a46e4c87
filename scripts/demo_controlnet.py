#!/usr/bin/env python
"""ControlNet demo on the shipped offline default (models/default): `make demo` -> outputs/demo.png.

    python scripts/demo_controlnet.py [--steps 20] [--out outputs/demo.png]

Two runs of the sampling CLI (controlnet.cli, `cn-sample`): a real photograph shipped with scikit-image (the
astronaut, skimage.data.astronaut()) through Canny edges, and a held-out fill condition (a circle outline,
scripts/make_fill_dataset.py) with its prompt. Each row of the figure is input | edges | samples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo.png")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--num_images", type=int, default=4)
    a = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from skimage import data

    from controlnet.cli import run
    from make_fill_dataset import fill_sample

    work = Path(a.out).with_suffix("")  # outputs/demo/: inputs and the CLI's outputs
    work.mkdir(parents=True, exist_ok=True)
    photo = work / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    _, outline, rec = fill_sample(np.random.default_rng(7), 64)
    cond = work / "fill_condition.png"
    Image.fromarray(outline).save(cond)

    jobs = [("astronaut photo -> Canny edges", "white circle with blue background",
             ["--image", str(photo), "--low", "100", "--high", "200"]),
            ("held-out fill condition", rec["prompt"], ["--condition", str(cond)])]
    common = ["--steps", str(a.steps), "--sampler", a.sampler, "--num_images", str(a.num_images), "--seed", "0",
              "--threads", "1"]
    fig, axes = plt.subplots(len(jobs), 1, figsize=(2 + 1.6 * (a.num_images + 2), 2.4 * len(jobs)))
    for ax, (title, prompt, src) in zip(axes, jobs):
        out = work / title.split()[0]
        grid = run([*src, "--prompt", prompt, "--out", str(out), *common])[0]
        ax.imshow(np.asarray(Image.open(grid)), interpolation="nearest")
        ax.set_title(f'{title}: input | edges | samples for "{prompt}"', fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return Path(a.out)


if __name__ == "__main__":
    main()
