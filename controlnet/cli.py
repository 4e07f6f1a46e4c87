"""cn-sample: text + edge-map sampling with a ControlNet (Zhang, Rao & Agrawala 2023) from the command line.

    cn-sample --image photo.png --prompt "red circle with blue background"      # canny edges of the photo
    cn-sample --condition edges.png --prompt "..." --sampler heun --steps 10 --out outputs/run1

Defaults to the shipped offline model (models/default/base + models/default/controlnet); --model / --controlnet
take any local diffusers Stable Diffusion 1.x directory and ControlNet directory. Every input is validated before
anything is generated, and the outputs (grid.png = input | edges | samples, sample_<i>.png) are written to
temporary names and renamed at the end, so a failed run leaves nothing behind. Sample i uses seed + i through
its own generator: images depend on the seed only, not on the batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
DEFAULT_MODEL, DEFAULT_CONTROLNET = DEFAULT_DIR / "base", DEFAULT_DIR / "controlnet"
PROG = "cn-sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="input image; its Canny edges (--low/--high) are the condition")
    src.add_argument("--condition", help="ready condition image (e.g. a white-on-black edge map), used as is")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative_prompt", default="", help="negative prompt (the unconditional branch of CFG)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local diffusers Stable Diffusion pipeline directory")
    p.add_argument("--controlnet", default=str(DEFAULT_CONTROLNET), help="local diffusers ControlNet directory")
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler name from diffusion.SAMPLERS")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (>= 1)")
    p.add_argument("--time_grid", default=None, help="time grid from diffusion.TIME_GRIDS (default: trailing; "
                   "log_snr is more accurate from ~20 steps, see docs/sampling.md)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--conditioning_scale", type=float, default=1.0, help="ControlNet residual scale")
    p.add_argument("--guess_mode", action="store_true", help="ControlNet on the conditional CFG branch only")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--num_images", type=int, default=4, help="number of samples")
    p.add_argument("--height", type=int, default=None, help="output height, multiple of 8 (default: model's)")
    p.add_argument("--width", type=int, default=None, help="output width, multiple of 8 (default: model's)")
    p.add_argument("--low", type=int, default=100, help="Canny low threshold (--image)")
    p.add_argument("--high", type=int, default=200, help="Canny high threshold (--image)")
    p.add_argument("--out", default="outputs/samples", help="output directory (created)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the fastest on a busy shared CPU "
                   "for this small model)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


# ----------------------------------------------------------------------------------------------- validation
def _read_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{what}: {path} not found; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def model_configs(model: str, controlnet: str) -> dict:
    """unet / vae / ControlNet configs of the two directories, checked for compatibility (no weights loaded)."""
    m, c = Path(model), Path(controlnet)
    fix_m = "pass --model DIR, a local diffusers Stable Diffusion directory (unet/ vae/ text_encoder/ tokenizer/ " \
            "scheduler/), e.g. models/default/base"
    if not m.is_dir():
        raise ValueError(f"--model {m} is not a directory; {fix_m}")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (m / sub).is_dir():
            raise ValueError(f"--model {m} has no {sub}/ folder; {fix_m}")
    unet = _read_json(m / "unet" / "config.json", "--model", fix_m)
    vae = _read_json(m / "vae" / "config.json", "--model", fix_m)
    fix_c = "pass --controlnet DIR, a diffusers ControlNet directory (config.json + diffusion_pytorch_model." \
            "safetensors) trained for this base model, e.g. models/default/controlnet"
    if not c.is_dir():
        raise ValueError(f"--controlnet {c} is not a directory; {fix_c}")
    cn = _read_json(c / "config.json", "--controlnet", fix_c)
    if cn.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"--controlnet {c} holds a {cn['_class_name']}, not a ControlNetModel; {fix_c}")
    keys = ("in_channels", "block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types")
    diff = [f"{k}: ControlNet {cn.get(k)} vs base UNet {unet.get(k)}" for k in keys
            if cn.get(k) is not None and unet.get(k) is not None and _norm(cn[k]) != _norm(unet[k])]
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    hint_factor = 2 ** (len(cn.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    if hint_factor != vae_factor:
        diff.append(f"condition downscale: ControlNet {hint_factor}x vs base VAE {vae_factor}x")
    if diff:
        raise ValueError(f"--controlnet {c} does not match --model {m} (mismatch: {'; '.join(diff)}); "
                         f"use a ControlNet trained for this base (models/default/controlnet goes with "
                         f"models/default/base)")
    return {"unet": unet, "vae": vae, "controlnet": cn, "vae_factor": vae_factor}


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def read_image(path: str, flag: str) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file; ValueError naming the flag and the fix when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {path}: file not found; pass the path of a PNG/JPEG image")
    from diffusion.data import to_8bit

    try:
        with Image.open(p) as im:  # 16-bit PNGs scaled to 8 bits (PIL's convert would clip them to white)
            return np.asarray(to_8bit(im).convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({type(e).__name__}: {e}); pass a PNG/JPEG "
                         f"image file") from None


def fit(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover height x width (bicubic, antialiased), then center-crop."""
    from PIL import Image, ImageOps

    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(ImageOps.fit(Image.fromarray(rgb), (width, height), Image.BICUBIC))


def validate(args: argparse.Namespace) -> dict:
    """Check every argument and input before any model runs; returns the configs, input and condition images."""
    from diffusion import SAMPLERS, TIME_GRIDS

    from .canny import canny

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown --sampler {args.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")
    if args.time_grid is not None and args.time_grid not in TIME_GRIDS:
        raise ValueError(f"unknown --time_grid {args.time_grid!r}; valid: {', '.join(sorted(TIME_GRIDS))}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must be >= 0 (1 disables guidance), got {args.guidance_scale}")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"--{flag} must be a positive multiple of 8, got {v}; e.g. --{flag} "
                             f"{max(8, 8 * round(v / 8))}")
    if not 0 <= args.low <= args.high:
        raise ValueError(f"Canny thresholds need 0 <= --low <= --high, got --low {args.low} --high {args.high}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; pass a directory path")
    cfgs = model_configs(args.model, args.controlnet)
    native = cfgs["unet"].get("sample_size", 64)
    native = native[0] if isinstance(native, (list, tuple)) else native
    h = args.height or native * cfgs["vae_factor"]
    w = args.width or native * cfgs["vae_factor"]
    if h % cfgs["vae_factor"] or w % cfgs["vae_factor"]:
        raise ValueError(f"--height/--width must be multiples of the VAE factor {cfgs['vae_factor']}, got {h}x{w}")
    if args.image is not None:
        raw = read_image(args.image, "--image")
        inp = fit(raw, h, w)
        edges = canny(inp, args.low, args.high)
    else:
        raw = read_image(args.condition, "--condition")
        inp = edges = fit(raw, h, w)
    return {**cfgs, "height": h, "width": w, "input": inp, "edges": edges, "out": out}


# ----------------------------------------------------------------------------------------------- generation
def load_pipeline(model=DEFAULT_MODEL, controlnet=DEFAULT_CONTROLNET):
    """ControlNetPipeline (fp32, CPU) of a base directory and a ControlNet directory."""
    from .pipeline import ControlNetPipeline

    return ControlNetPipeline.from_pretrained(str(model), controlnet=str(controlnet))


def generate(pipe, prompt: str, condition: np.ndarray, num_images: int = 4, seed: int = 0, sampler: str = "dpmpp_2m",
             steps: int = 20, guidance_scale: float = 3.0, conditioning_scale: float = 1.0, guess_mode: bool = False,
             negative_prompt: str = "", height: Optional[int] = None, width: Optional[int] = None,
             progress: bool = False, time_grid: Optional[str] = None) -> np.ndarray:
    """(num_images, H, W, 3) uint8 samples; sample i is drawn from its own generator seeded seed + i."""
    from diffusion import generators_from_seeds

    h, w = height or condition.shape[0], width or condition.shape[1]
    imgs = pipe(prompt, condition, negative_prompt=negative_prompt, height=h, width=w, num_images_per_prompt=num_images,
                sampler=sampler, steps=steps, time_grid=time_grid, guidance_scale=guidance_scale,
                controlnet_conditioning_scale=conditioning_scale, guess_mode=guess_mode,
                generator=generators_from_seeds(seed, num_images), output_type="np", progress=progress)
    return (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)


def write_outputs(out: Path, inp: np.ndarray, edges: np.ndarray, samples: np.ndarray) -> list[Path]:
    """grid.png (input | edges | samples) and sample_<i>.png, via temporary names renamed at the very end."""
    from PIL import Image

    from .pipeline import image_grid

    out.mkdir(parents=True, exist_ok=True)
    files = {out / "grid.png": image_grid([[inp, edges, *samples]])}
    files.update({out / f"sample_{i:02d}.png": s for i, s in enumerate(samples)})
    tmps = []
    try:
        for path, arr in files.items():
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmps.append(tmp)
            Image.fromarray(arr).save(tmp, format="PNG")
        for tmp, path in zip(tmps, files):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return list(files)


def run(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Parse, validate, generate, write; raises ValueError for bad input (before anything is written)."""
    args = build_parser().parse_args(argv)
    v = validate(args)
    import torch

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.controlnet)
    samples = generate(pipe, args.prompt, v["edges"], args.num_images, args.seed, args.sampler, args.steps,
                       args.guidance_scale, args.conditioning_scale, args.guess_mode, args.negative_prompt,
                       v["height"], v["width"], progress=not args.no_progress, time_grid=args.time_grid)
    paths = write_outputs(v["out"], v["input"], v["edges"], samples)
    print(f"wrote {paths[0]} (input | edges | {len(samples)} samples) and {len(samples)} samples "
          f"{paths[1].name}..{paths[-1].name} in {v['out']}")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: errors print `cn-sample: error: ...` and exit with status 2."""
    try:
        run(argv)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    main()
