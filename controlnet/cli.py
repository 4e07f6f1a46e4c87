"""cn-sample: text + edge-map sampling with a ControlNet (Zhang, Rao & Agrawala 2023) from the command line.

    cn-sample --image photo.png --prompt "red circle with blue background"      # canny edges of the photo
    cn-sample --condition edges.png --prompt "..." --sampler heun --steps 10 --out outputs/run1

Defaults to the shipped offline model (models/default/base + models/default/controlnet); --model / --controlnet take
any local diffusers SD 1.x/2.x, SDXL or SD3 pipeline directory (the family is read from model_index.json's
_class_name) and a ControlNet directory for it (ControlNetModel; SD3: SD3ControlNetModel). Every input is validated
before any weights load (arguments, --out, every config and weights file, the tokenizer, base/ControlNet
compatibility; errors exit with status 2 naming the file), and the outputs (grid.png = input | edges | samples,
sample_<i>.png, and settings.json: every argument resolved, model paths, seeds, device, dtype, package versions)
are written to temporary names and renamed at the end, so a failed run leaves nothing behind; sample_<i>.png files
of an earlier run in --out beyond this run's count are removed. Sample i uses seed + i through its own generator:
images depend on the seed only, not on the batch size or the device.

--device auto picks cuda, then mps, then cpu; --dtype (default fp16 on cuda / mps, fp32 on cpu) is the networks'
precision, the sampler state stays float32; --compile runs torch.compile on the UNet and ControlNet; --cpu_offload
keeps the networks on the CPU and moves each to the device only while it runs (for small GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .cli_inputs import (
    model_configs, check_files, check_out, condition_warnings, read_image, fit, sample_options,
)

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
DEFAULT_MODEL, DEFAULT_CONTROLNET = DEFAULT_DIR / "base", DEFAULT_DIR / "controlnet"
PROG = "cn-sample"
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # controlnet.runtime.DTYPES (not imported: torch-free --help)
GUESS_MODE_SCALES = ("diffusers", "original")  # controlnet.model.GUESS_MODE_SCALES (not imported: torch-free --help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="input image; its Canny edges (--low/--high) are the condition")
    src.add_argument("--condition", help="ready condition image (e.g. a white-on-black edge map), used as is")
    p.add_argument("--invert_condition", action="store_true", help="invert the --condition image (for black edges "
                   "on white)")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative_prompt", default=None, help="negative prompt (the unconditional branch of CFG; "
                   "default: none, which is the empty prompt, or zero embeddings for SDXL as in diffusers)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local diffusers pipeline directory: SD 1.x/2.x, "
                   "SDXL or SD3 (the family is read from model_index.json)")
    p.add_argument("--controlnet", default=str(DEFAULT_CONTROLNET), help="local diffusers ControlNet directory "
                   "(ControlNetModel; SD3: SD3ControlNetModel)")
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler name from diffusion.SAMPLERS")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (>= 1; default 20, or the steps of a "
                   "--time_grid .json file)")
    p.add_argument("--time_grid", default=None, help="time grid from diffusion.TIME_GRIDS (default: the measured "
                   "best for the sampler, steps and model, see docs/sampling.md), or a .json grid fitted to the "
                   "model by scripts/fit_grid.py")
    g = p.add_argument_group("time grid options (each for the grids that take it; see docs/sampling.md)")
    g.add_argument("--sigma_min", type=float, default=None, help="karras: smallest EDM sigma (default: the model's)")
    g.add_argument("--sigma_max", type=float, default=None, help="karras: largest EDM sigma (default: the model's)")
    g.add_argument("--rho", type=float, default=None, help="karras: the EDM rho (default 7)")
    g.add_argument("--shift", type=float, default=None, help="shifted: the SD3 time shift (default: the model's or 3)")
    g.add_argument("--t_max", type=float, default=None, help="uniform / trailing / log_snr: start time in (0, 1]")
    g.add_argument("--sigmas", default=None, help="explicit grid of EDM sigmas, comma-separated, decreasing, ending at "
                   "0 (e.g. 14.6,2.9,0.9,0.3,0); replaces --time_grid / --steps")
    s = p.add_argument_group("sampler options (each for the samplers that take it)")
    s.add_argument("--eta", type=float, default=None, help="ddim / ancestral / SDE samplers: noise scale (0: ODE)")
    s.add_argument("--s_noise", type=float, default=None, help="SDE samplers, euler / heun churn: noise multiplier")
    s.add_argument("--noise", choices=("brownian", "iid"), default=None, help="SDE samplers: fresh noise per step "
                   "(iid) or a Brownian tree (seed-determined at any step count)")
    s.add_argument("--order", type=int, default=None, help="unipc / lms / dpm_adaptive: solver order")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--conditioning_scale", type=float, default=1.0, help="ControlNet residual scale")
    p.add_argument("--guess_mode", action="store_true", help="ControlNet on the conditional CFG branch only, "
                   "deeper residuals weighted more")
    p.add_argument("--guess_mode_scales", choices=GUESS_MODE_SCALES, default=None, help="guess-mode weights of the "
                   "residuals, shallow to deep: diffusers = logspace(-1, 0, 13) (default), original = lllyasviel's "
                   "0.825 ** (12 - i); up to 0.6%% apart")
    p.add_argument("--only_mid_control", action="store_true", help="add only the mid-block residual (the original "
                   "ControlNet's only_mid_control), not the skip-connection ones")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--num_images", type=int, default=4, help="number of samples")
    p.add_argument("--height", type=int, default=None, help="output height, multiple of 8 (default: model's)")
    p.add_argument("--width", type=int, default=None, help="output width, multiple of 8 (default: model's)")
    p.add_argument("--low", type=int, default=100, help="Canny low threshold (--image)")
    p.add_argument("--high", type=int, default=200, help="Canny high threshold (--image)")
    p.add_argument("--out", default="outputs/samples", help="output directory (created; the sample_<i>.png of an "
                   "earlier run there are replaced or removed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the fastest on a busy shared CPU "
                   "for this small model)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    r = p.add_argument_group("device and precision (see docs/sampling.md)")
    r.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    r.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="network precision (default: fp16 on cuda / "
                   "mps, fp32 on cpu); the sampler state stays float32")
    r.add_argument("--compile", action="store_true", help="torch.compile the UNet / transformer and ControlNet "
                   "(the first step compiles, later steps run faster)")
    r.add_argument("--cpu_offload", action="store_true", help="keep the networks on the CPU and move each to "
                   "--device only while it runs (text encoders, then UNet + ControlNet, then VAE): less GPU memory")
    return p


# ----------------------------------------------------------------------------------------------- validation




def validate(args: argparse.Namespace) -> dict:
    """Check every argument and input before any model runs; returns the configs, input and condition images."""
    from diffusion import SAMPLERS, TIME_GRIDS, load_time_grid, schedule_from_diffusers
    from diffusion.fitted_grid import is_grid_file

    from .canny import canny

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown --sampler {args.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")
    grid_file = args.time_grid is not None and is_grid_file(args.time_grid)
    if args.time_grid is not None and not grid_file and args.time_grid not in TIME_GRIDS:
        raise ValueError(f"unknown --time_grid {args.time_grid!r}; valid: {', '.join(sorted(TIME_GRIDS))}, or a "
                         f".json grid file (scripts/fit_grid.py)")
    if args.steps is not None and args.steps < 1:
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
    if args.invert_condition and args.condition is None:
        raise ValueError("--invert_condition applies to a --condition image only (--image makes white-on-black "
                         "Canny edges itself)")
    if args.guess_mode_scales is not None and not args.guess_mode:
        raise ValueError("--guess_mode_scales only applies with --guess_mode; add --guess_mode or drop it")
    from .runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.cpu_offload and device.type == "cpu":
        raise ValueError("--cpu_offload moves the networks to an accelerator only while they run; with --device cpu "
                         "(or auto without a GPU) everything is on the CPU already: drop --cpu_offload")
    out = Path(args.out)
    check_out(out)
    cfgs = model_configs(args.model, args.controlnet)
    native = cfgs.get("unet", cfgs.get("transformer", {})).get("sample_size", 64)
    native = native[0] if isinstance(native, (list, tuple)) else native
    h = args.height or native * cfgs["vae_factor"]
    w = args.width or native * cfgs["vae_factor"]
    if h % cfgs["vae_factor"] or w % cfgs["vae_factor"]:
        raise ValueError(f"--height/--width must be multiples of the VAE factor {cfgs['vae_factor']}, got {h}x{w}")
    if h % cfgs.get("pixel_multiple", 1) or w % cfgs.get("pixel_multiple", 1):
        raise ValueError(f"--height/--width must be multiples of {cfgs['pixel_multiple']} for SD3 (VAE factor x "
                         f"patch size), got {h}x{w}")
    if cfgs.get("family") == "sd3" and (args.guess_mode or args.only_mid_control):
        raise ValueError("--guess_mode / --only_mid_control are UNet ControlNet options; SD3 ControlNets have "
                         "neither: drop them")
    if args.image is not None:
        raw = read_image(args.image, "--image")
        inp = fit(raw, h, w)
        edges = canny(inp, args.low, args.high)
    else:
        raw = read_image(args.condition, "--condition")
        raw = 255 - raw if args.invert_condition else raw
        for msg in condition_warnings(raw):  # on the image as given: resizing blurs edges into mid-tones
            print(f"{PROG}: warning: {msg}", file=sys.stderr)
        inp = edges = fit(raw, h, w)
    check_files(args.model, args.controlnet, cfgs)
    steps = args.steps or 20
    if grid_file:  # its steps, schedule and times checked now, before any weights load
        schedule = schedule_from_diffusers(cfgs["scheduler"])  # readable: check_files tried it
        steps = load_time_grid(args.time_grid, args.steps, schedule, args.sampler).steps
    return {**cfgs, "height": h, "width": w, "input": inp, "edges": edges, "out": out, "steps": steps,
            "device": device, "dtype": dtype}


# ----------------------------------------------------------------------------------------------- generation
def load_pipeline(model=DEFAULT_MODEL, controlnet=DEFAULT_CONTROLNET, device="cpu", dtype=None,
                  cpu_offload: bool = False, compile: bool = False):
    """The pipeline of the base's family (SD / SDXL / SD3) with a ControlNet directory, its networks in `dtype`
    (default float32) on `device` (with cpu_offload: on the CPU, moved to `device` while used), compiled on request;
    a loader failure (one the checks of `validate` did not foresee) becomes a ValueError naming both directories."""
    import torch

    from .families import pipeline_class

    try:
        pipe = pipeline_class(model).from_pretrained(str(model), controlnet=str(controlnet),
                                                     dtype=dtype or torch.float32,
                                                     device="cpu" if cpu_offload else device)
    except Exception as e:  # noqa: BLE001 - diffusers / transformers / safetensors raise many kinds
        raise ValueError(f"cannot load --model {model} with --controlnet {controlnet} ({type(e).__name__}: {e}); "
                         f"check the files named above, or rebuild the directory with save_pretrained") from None
    if cpu_offload:
        pipe.enable_model_cpu_offload(device)
    if compile:
        pipe.compile()
    return pipe


def generate(pipe, prompt: str, condition: np.ndarray, num_images: int = 4, seed: int = 0, sampler: str = "dpmpp_2m",
             steps: int = 20, guidance_scale: float = 3.0, conditioning_scale: float = 1.0, guess_mode: bool = False,
             negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
             progress: bool = False, time_grid: Optional[str] = None, guess_mode_scales: str = "diffusers",
             only_mid_control: bool = False, sample_options: Optional[dict] = None) -> np.ndarray:
    """(num_images, H, W, 3) uint8 samples; sample i is drawn from its own generator seeded seed + i.
    `sample_options` go to diffusion.sample (grid_options, sigmas, eta, s_noise, noise, order)."""
    from diffusion import generators_from_seeds
    from diffusion.images import to_uint8

    h, w = height or condition.shape[0], width or condition.shape[1]
    imgs = pipe(prompt, condition, negative_prompt=negative_prompt, height=h, width=w, num_images_per_prompt=num_images,
                sampler=sampler, steps=steps, time_grid=time_grid, guidance_scale=guidance_scale,
                controlnet_conditioning_scale=conditioning_scale, guess_mode=guess_mode, **(sample_options or {}),
                guess_mode_scales=guess_mode_scales, only_mid_control=only_mid_control,
                generator=generators_from_seeds(seed, num_images), output_type="np", progress=progress).images
    return to_uint8(imgs)


def write_outputs(out: Path, inp: np.ndarray, edges: np.ndarray, samples: np.ndarray,
                  settings: Optional[dict] = None) -> list[Path]:
    """grid.png (input | edges | samples), sample_<i>.png and (given) settings.json, via temporary names renamed at
    the very end."""
    from PIL import Image

    from diffusion.images import image_grid

    out.mkdir(parents=True, exist_ok=True)
    files = {out / "grid.png": image_grid([[inp, edges, *samples]])}
    files.update({out / f"sample_{i:02d}.png": s for i, s in enumerate(samples)})
    if settings is not None:
        files[out / "settings.json"] = settings
    tmps = []
    try:
        for path, arr in files.items():
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmps.append(tmp)
            if isinstance(arr, dict):
                tmp.write_text(json.dumps(arr, indent=2) + "\n")
            else:
                Image.fromarray(arr).save(tmp, format="PNG")
        for tmp, path in zip(tmps, files):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return list(files)


def remove_stale_samples(out: Path, keep: Sequence[Path]) -> list[Path]:
    """Delete sample_<i>.png files in `out` that this run did not write (left by an earlier run with more images)."""
    stale = [p for p in out.iterdir() if re.fullmatch(r"sample_\d{2,}\.png", p.name) and p not in set(keep)]
    for p in stale:
        p.unlink()
    return sorted(stale)


def run_settings(args: argparse.Namespace, v: dict, options: dict) -> dict:
    """settings.json: every argument as resolved (steps, size, time grid, device, dtype), absolute model paths, the
    seed of each image, the device's name and package versions -- what it takes to redraw the images."""
    import torch

    from diffusion import schedule_from_diffusers
    from diffusion.timesteps import default_time_grid

    from .runtime import dtype_name, package_versions

    resolved = dict(vars(args), steps=v["steps"], height=v["height"], width=v["width"], device=str(v["device"]),
                    dtype=dtype_name(v["dtype"]),
                    guess_mode_scales=(args.guess_mode_scales or "diffusers") if args.guess_mode else None,
                    model=str(Path(args.model).resolve()), controlnet=str(Path(args.controlnet).resolve()),
                    out=str(Path(args.out).resolve()))
    if args.time_grid is None and args.sigmas is None:
        resolved["time_grid"] = default_time_grid(schedule_from_diffusers(v["scheduler"]), args.sampler, v["steps"])
    dev = v["device"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return {"program": PROG, "arguments": resolved, "family": v.get("family", "sd"),
            "seeds": [args.seed + i for i in range(args.num_images)],
            "images": [f"sample_{i:02d}.png" for i in range(args.num_images)],
            "sample_options": options, "device_name": name, "versions": package_versions()}


def run(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Parse, validate, generate, write; raises ValueError for bad input (before anything is written)."""
    args = build_parser().parse_args(argv)
    v = validate(args)
    options = sample_options(args, v)
    import torch

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.controlnet, v["device"], v["dtype"], args.cpu_offload, args.compile)
    samples = generate(pipe, args.prompt, v["edges"], args.num_images, args.seed, args.sampler, v["steps"],
                       args.guidance_scale, args.conditioning_scale, args.guess_mode, args.negative_prompt,
                       v["height"], v["width"], progress=not args.no_progress, time_grid=args.time_grid,
                       guess_mode_scales=args.guess_mode_scales or "diffusers",
                       only_mid_control=args.only_mid_control, sample_options=options)
    paths = write_outputs(v["out"], v["input"], v["edges"], samples, run_settings(args, v, options))
    stale = remove_stale_samples(v["out"], paths)
    print(f"wrote {paths[0]} (input | edges | {len(samples)} samples), {len(samples)} samples "
          f"{paths[1].name}..{paths[len(samples)].name} and {paths[-1].name} in {v['out']}"
          + (f"; removed {len(stale)} stale sample_*.png of an earlier run ({stale[0].name}..)" if stale else ""))
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
