"""cn-sample's input checks, run before any weights load: model directories, --out, condition images, and the
grid / sampler options (torch-free at import, so `cn-sample --help` stays fast)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

GRID_FLAGS = ("sigma_min", "sigma_max", "rho", "shift", "t_max")  # diffusion.timesteps grid options
SAMPLER_FLAGS = ("eta", "s_noise", "noise", "order")  # keyword options of some diffusion.SAMPLERS
FIX_MODEL = ("pass --model DIR, a local diffusers Stable Diffusion directory (unet/ vae/ text_encoder/ tokenizer/ "
             "scheduler/), e.g. models/default/base")
FIX_CONTROLNET = ("pass --controlnet DIR, a diffusers ControlNet directory (config.json + diffusion_pytorch_model."
                  "safetensors) trained for this base model, e.g. models/default/controlnet")


def _controlnet_subfolders(c: Path) -> list[Path]:
    """Subfolders of c (two levels) whose config.json describes a ControlNetModel, e.g. checkpoint-N/controlnet."""
    from .preflight import read_json

    found = []
    for cfg in sorted([*c.glob("*/config.json"), *c.glob("*/*/config.json")]):
        try:
            if read_json(cfg).get("_class_name") == "ControlNetModel":
                found.append(cfg.parent)
        except ValueError:
            pass
    return found


def model_configs(model: str, controlnet: str) -> dict:
    """unet / vae / text encoder / scheduler / tokenizer / ControlNet configs of the two directories, their value
    types and the compatibility of base and ControlNet checked (no weights read)."""
    from .preflight import check_config_values, read_json

    m, c = Path(model), Path(controlnet)
    if not m.is_dir():
        raise ValueError(f"--model {m} is not a directory; {FIX_MODEL}")
    from .families import family_configs, pipeline_family

    if (family := pipeline_family(m)) != "sd":  # SDXL / SD3: their own parts and ControlNet class
        return family_configs(family, m, c)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (m / sub).is_dir():
            raise ValueError(f"--model {m} has no {sub}/ folder; {FIX_MODEL}")
    cfgs = {sub: read_json(m / sub / "config.json", FIX_MODEL) for sub in ("unet", "vae", "text_encoder")}
    cfgs["scheduler"] = read_json(m / "scheduler" / "scheduler_config.json", FIX_MODEL)
    if not c.is_dir():
        raise ValueError(f"--controlnet {c} is not a directory; {FIX_CONTROLNET}")
    if not (c / "config.json").is_file() and (subs := _controlnet_subfolders(c)):
        raise ValueError(f"--controlnet {c} has no config.json, but its subfolder {subs[0]} holds a ControlNet (a "
                         f"training checkpoint keeps it in checkpoint-N/controlnet); pass --controlnet {subs[0]}")
    cn = cfgs["controlnet"] = read_json(c / "config.json", FIX_CONTROLNET)
    if cn.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"--controlnet {c} holds a {cn['_class_name']}, not a ControlNetModel; {FIX_CONTROLNET}")
    check_config_values(m, c, cfgs)
    unet, vae, te = cfgs["unet"], cfgs["vae"], cfgs["text_encoder"]
    base = [f"{k}: unet {unet.get(k)} vs {name} {other.get(k2)}" for k, name, other, k2 in (
        ("in_channels", "vae latent_channels", vae, "latent_channels"),
        ("cross_attention_dim", "text_encoder hidden_size", te, "hidden_size"))
        if isinstance(unet.get(k), int) and isinstance(other.get(k2), int) and unet[k] != other[k2]]
    if base:
        raise ValueError(f"--model {m}: its parts do not fit together ({'; '.join(base)}); {FIX_MODEL}")
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
    return {**cfgs, "vae_factor": vae_factor}


def check_files(model: str, controlnet: str, cfgs: dict) -> None:
    """Weights headers, names and shapes, the tokenizer and the schedule of both directories (no weights loaded)."""
    from .preflight import check_controlnet_files, check_pipeline_files

    if cfgs.get("family", "sd") != "sd":
        from .families import check_family_files
        return check_family_files(cfgs["family"], Path(model), Path(controlnet), cfgs)

    check_pipeline_files(Path(model), cfgs)
    check_controlnet_files(Path(controlnet), cfgs["controlnet"])


def check_out(out: Path) -> None:
    """--out must be a directory or creatable in a writable one (probed with a temporary file, nothing left)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; pass a directory path")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, so no directory can be made there; pass a directory path")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {parent} ({e.strerror or e}); pass a writable directory") \
            from None


def condition_warnings(rgb: np.ndarray, flag: str = "--condition") -> list[str]:
    """Warnings for a --condition image that does not look like an edge map (white edges on black)."""
    gray = rgb.astype(np.float32).mean(axis=2)
    mid_tones = float(((gray > 24) & (gray < 232)).mean())  # neither near black nor near white
    colour = float((rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).mean())  # mean channel spread
    if mid_tones > 0.25 or colour > 16:
        return [f"{flag} looks like a photo, not an edge map ({mid_tones:.0%} mid-tones, mean colour spread "
                f"{colour:.0f}/255); if this ControlNet expects edges (the default canny one does), pass the photo "
                f"as --image so that Canny edges are computed from it"]
    white = float((gray >= 128).mean())
    if white > 0.5:
        return [f"{flag} looks inverted: {white:.0%} of it is white, while edge maps are white edges on black; "
                f"pass --invert_condition (or the photo as --image)"]
    return []


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def read_image(path: str, flag: str) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file; ValueError naming the flag and the fix when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from diffusion.images import read_image as read

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {path}: file not found; pass the path of a PNG/JPEG image")
    try:  # the one reader: EXIF orientation, 16-bit / float scaled to 8 bits, palette / alpha, pixel limit
        return np.asarray(read(p), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({type(e).__name__}: {e}); pass a PNG/JPEG "
                         f"image file") from None


def fit(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover height x width (bicubic, antialiased), then center-crop."""
    from PIL import Image, ImageOps

    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(ImageOps.fit(Image.fromarray(rgb), (width, height), Image.BICUBIC))


def sample_options(args: argparse.Namespace, v: dict) -> dict:
    """diffusion.sample keywords from the grid / sampler flags, checked against the grid and sampler in use
    (`v`: validate's result); an option the grid or sampler lacks is an error naming the ones it has."""
    import inspect

    from diffusion import SAMPLERS, schedule_from_diffusers
    from diffusion.fitted_grid import is_grid_file
    from diffusion.timesteps import default_time_grid, get_timesteps, grid_options, timesteps_from_sigmas

    schedule = schedule_from_diffusers(v["scheduler"])
    params = inspect.signature(SAMPLERS[args.sampler]).parameters
    out = {f: getattr(args, f) for f in SAMPLER_FLAGS if getattr(args, f) is not None}
    for f in out:
        if f not in params:
            valid = [f"--{o}" for o in SAMPLER_FLAGS if o in params]
            raise ValueError(f"--{f} is not an option of --sampler {args.sampler}; its options: "
                             f"{', '.join(valid) or 'none'}")
    grid = {f: getattr(args, f) for f in GRID_FLAGS if getattr(args, f) is not None}
    if args.sigmas is not None:
        if args.time_grid is not None or grid:
            raise ValueError("--sigmas is a complete time grid: drop --time_grid and the grid options "
                             f"({', '.join('--' + f for f in grid) or '--time_grid'})")
        try:
            sigmas = [float(x) for x in args.sigmas.split(",")]
        except ValueError:
            raise ValueError(f"--sigmas must be comma-separated numbers ending at 0 (e.g. 14.6,2.9,0.3,0), got "
                             f"{args.sigmas!r}") from None
        if args.steps is not None and args.steps != len(sigmas) - 1:
            raise ValueError(f"--steps {args.steps} but --sigmas has {len(sigmas) - 1} steps; drop --steps")
        timesteps_from_sigmas(sigmas, schedule)  # every check now, before any weights load
        return {**out, "sigmas": sigmas}
    if grid:
        if args.time_grid is not None and is_grid_file(args.time_grid):
            raise ValueError(f"a .json --time_grid is used as written: drop {', '.join('--' + f for f in grid)}")
        name = args.time_grid or default_time_grid(schedule, args.sampler, v["steps"])
        valid = [o for o in grid_options(name) if o in GRID_FLAGS]  # those cn-sample has a flag for
        for f in grid:
            if f not in valid:
                how = "" if args.time_grid else " (the default grid here; pick one with --time_grid)"
                raise ValueError(f"--{f} is not an option of time grid {name!r}{how}; its options: "
                                 f"{', '.join('--' + o for o in valid) or 'none'}")
        get_timesteps(name, v["steps"], schedule, **grid)  # values checked (e.g. 0 < sigma_min < sigma_max)
        out["grid_options"] = grid
    return out
