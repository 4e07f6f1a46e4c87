"""Weights I/O for ControlNet (Zhang, Rao & Agrawala 2023): diffusers directories, single files, pickle policy."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ControlNetConfig, config_from_unet
from .convert import is_original_layout, original_to_diffusers

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
PICKLE_SUFFIXES = (".ckpt", ".pth", ".bin", ".pt")


def read_state_dict(path, allow_pickle: bool = False) -> dict:
    """Tensors of a ``.safetensors`` file; pickle formats only with ``allow_pickle=True`` (then weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"refusing to unpickle {path}: pickle checkpoints can run arbitrary code. Convert it "
                             f"to .safetensors, or pass allow_pickle=True to load it with "
                             f"torch.load(weights_only=True)")
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "module"):  # Lightning / training-loop checkpoints
            if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
        if not isinstance(sd, dict):
            raise ValueError(f"{path} does not contain a state dict (got {type(sd).__name__})")
        return sd
    raise ValueError(f"unknown checkpoint format {path.suffix!r} for {path}; expected .safetensors "
                     f"(or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle=True)")


def _preview(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} total)" if len(keys) > n else "")


def load_state_dict_strict(module: torch.nn.Module, sd: dict, source: str) -> None:
    """Load ``sd`` requiring exact key and shape agreement; the error names the source and the offending keys."""
    own = module.state_dict()
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source} does not match the ControlNet ({type(module).__name__}) state dict:"]
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:5])}")
        raise RuntimeError("\n  ".join(parts))
    module.load_state_dict(sd, strict=True)


def load_weights_file(model, path, allow_pickle: bool = False) -> None:
    """Strictly load a weights file in diffusers or original (``control_model.*``) layout into ``model``."""
    sd = read_state_dict(path, allow_pickle)
    if is_original_layout(sd):
        sd = original_to_diffusers(sd, model.config)
        own = model.state_dict()
        for k, v in sd.items():  # ldm proj_in/out may be 1x1 convs where the config asks for linear (or reverse)
            if k.endswith(("proj_in.weight", "proj_out.weight")) and k in own and v.shape != own[k].shape \
                    and v.numel() == own[k].numel():
                sd[k] = v.reshape(own[k].shape)
    load_state_dict_strict(model, sd, str(path))


def _weights_in_dir(d: Path, variant: Optional[str], allow_pickle: bool) -> list:
    def name(base):
        stem, ext = base.rsplit(".", 1)
        return f"{stem}.{variant}.{ext}" if variant else base

    index = d / (name(WEIGHTS_NAME) + ".index.json")
    if index.is_file():  # sharded checkpoint
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    for base in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (d / name(base)).is_file():
            return [d / name(base)]
    raise FileNotFoundError(f"no {name(WEIGHTS_NAME)} (or {name(PICKLE_WEIGHTS_NAME)}) in {d}")


def load_pretrained(cls, path, subfolder: Optional[str] = None, variant: Optional[str] = None,
                    allow_pickle: bool = False, torch_dtype: Optional[torch.dtype] = None):
    """Build ``cls`` from ``config.json`` in ``path`` and load its weights strictly."""
    d = Path(path) / subfolder if subfolder else Path(path)
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d / CONFIG_NAME} not found (expected a diffusers-style ControlNet directory; "
                                f"use ControlNet.from_single_file for a lone checkpoint file)")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{d / CONFIG_NAME} describes a {cfg['_class_name']}, not a ControlNetModel")
    model = cls(ControlNetConfig.from_dict(cfg))
    files = _weights_in_dir(d, variant, allow_pickle)
    sd = {}
    for f in files:
        sd.update(read_state_dict(f, allow_pickle))
    load_state_dict_strict(model, sd, str(files[0] if len(files) == 1 else d))
    return model.to(torch_dtype) if torch_dtype is not None else model


def load_single_file(cls, path, config=None, unet=None, allow_pickle: bool = False):
    """Model from one file; config from ``config``, else ``unet`` (via from_unet rules), else SD1.5 defaults."""
    if not Path(path).is_file() or (Path(path).suffix != ".safetensors" and not allow_pickle):
        read_state_dict(path, allow_pickle)  # raises (missing / pickle without opt-in) before building a big model
    if config is None and unet is not None:
        config = config_from_unet(unet.config)
    model = cls(config if config is not None else ControlNetConfig(cross_attention_dim=768))
    load_weights_file(model, path, allow_pickle)
    return model


def save_pretrained(model, path) -> None:
    """config.json (diffusers ControlNetModel keys) + contiguous safetensors weights."""
    import diffusers

    os.makedirs(path, exist_ok=True)
    cfg = {"_class_name": "ControlNetModel", "_diffusers_version": diffusers.__version__, **model.config.to_dict()}
    Path(path, CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(Path(path, WEIGHTS_NAME)), metadata={"format": "pt"})
