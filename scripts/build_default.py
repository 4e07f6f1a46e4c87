#!/usr/bin/env python
"""Rebuild the shipped default model (models/default: base + canny ControlNet) from scratch, offline, on CPU.

    python scripts/build_default.py [--steps data,t2i,init_controlnet,controlnet,assemble] [--out models/default]

Steps (each skipped when its output exists, so an interrupted build continues; trainers resume from their latest
checkpoint):
  data             scripts/make_fill_dataset.py --out data/fill64 --n 6000 --size 64 --seed 0
  t2i              scripts/train_t2i.py --config configs/t2i_fill.yaml            (VAE, then UNet; text encoder frozen)
  init_controlnet  ControlNet.from_unet(base UNet) with a condition encoder matching the VAE factor, saved as the
                   starting point of the ControlNet run (Zhang et al. 2023: encoder copy + zero convolutions)
  controlnet       scripts/train_controlnet.py --config configs/controlnet_fill_default.yaml
  assemble         copy the pipeline to OUT/base and the ControlNet to OUT/controlnet (safetensors), print sizes
Trainers run as subprocesses with one intra-op thread (OMP_NUM_THREADS=1), the fastest setting on a shared CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("data", "t2i", "init_controlnet", "controlnet", "assemble")


def sh(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def init_controlnet(base: Path, out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from controlnet import ControlNet
    from controlnet.config import hint_widths

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vae_factor = 2 ** (len(AutoencoderKL.load_config(base, subfolder="vae")["block_out_channels"]) - 1)
    torch.manual_seed(0)
    ControlNet.from_unet(unet, conditioning_embedding_out_channels=hint_widths(vae_factor)).save_pretrained(out)
    print(f"initial ControlNet (copy of the UNet encoder, {vae_factor}x condition encoder) -> {out}")
    return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def assemble(pipeline: Path, controlnet_run: Path, out: Path) -> None:
    for sub in ("base", "controlnet"):
        shutil.rmtree(out / sub, ignore_errors=True)
    shutil.copytree(pipeline, out / "base")
    (out / "controlnet").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(controlnet_run / name, out / "controlnet" / name)
    for sub in ("base", "controlnet"):
        print(f"{out / sub}: {dir_size(out / sub) / 2 ** 20:.2f} MiB")
    print(f"{out}: {dir_size(out) / 2 ** 20:.2f} MiB in total")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--t2i_config", default="configs/t2i_fill.yaml")
    p.add_argument("--controlnet_config", default="configs/controlnet_fill_default.yaml")
    p.add_argument("--out", default="models/default")
    a = p.parse_args(argv)
    steps = a.steps.split(",")
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"unknown steps {bad}; valid: {','.join(STEPS)}")
    t2i = yaml.safe_load((ROOT / a.t2i_config).read_text())
    cn = yaml.safe_load((ROOT / a.controlnet_config).read_text())
    data = ROOT / t2i["train_data_dir"]
    pipeline = ROOT / t2i["output_dir"] / "pipeline"
    cn_init, cn_run = ROOT / cn["controlnet_model_name_or_path"], ROOT / cn["output_dir"]

    if "data" in steps and not (data / "prompt.json").is_file():
        sh("scripts/make_fill_dataset.py", "--out", str(data), "--n", "6000", "--size", "64", "--seed", "0")
    if "t2i" in steps and not (pipeline / "model_index.json").is_file():
        sh("scripts/train_t2i.py", "--config", a.t2i_config, "--resume_from_checkpoint", "latest")
    if "init_controlnet" in steps and not (cn_init / "config.json").is_file():
        init_controlnet(pipeline, cn_init)
    if "controlnet" in steps and not (cn_run / "diffusion_pytorch_model.safetensors").is_file():
        sh("scripts/train_controlnet.py", "--config", a.controlnet_config, "--resume_from_checkpoint", "latest")
    if "assemble" in steps:
        assemble(pipeline, cn_run, ROOT / a.out)


if __name__ == "__main__":
    main()
