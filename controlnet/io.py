"""ControlNet weights I/O that diffusers does not do (Zhang, Rao & Agrawala 2023): single files in the diffusers or the
original lllyasviel ``control_model.*`` layout, strict loading, and the pickle refusal. Directories are diffusers'
``save_pretrained`` / ``from_pretrained`` (``ControlNet`` is a ModelMixin, see ``diffusion.models.pretrained``)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion.models.pretrained import mismatch_error, pickle_refusal

from .config import ControlNetConfig, config_from_unet
from .convert import is_original_layout, original_to_diffusers

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
            raise pickle_refusal(path)
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "module"):  # Lightning / training-loop checkpoints
            if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
        if not isinstance(sd, dict):
            raise ValueError(f"{path} does not contain a state dict (got {type(sd).__name__})")
        return sd
    raise ValueError(f"unknown checkpoint format {path.suffix!r} for {path}; expected .safetensors "
                     f"(or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle=True)")


def load_state_dict_strict(module: torch.nn.Module, sd: dict, source: str) -> None:
    """Load ``sd`` requiring exact key and shape agreement; the error names the source and the offending keys."""
    own = module.state_dict()
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]
    err = mismatch_error(source, type(module).__name__, set(own) - set(sd), set(sd) - set(own), shapes)
    if err is not None:
        raise err
    module.load_state_dict(sd, strict=True)


def load_weights_file(model, path, allow_pickle: bool = False) -> None:
    """Strictly load a weights file in diffusers or original (``control_model.*``) layout into ``model``."""
    sd = read_state_dict(path, allow_pickle)
    if is_original_layout(sd):
        sd = original_to_diffusers(sd, model.spec)
        own = model.state_dict()
        for k, v in sd.items():  # ldm proj_in/out may be 1x1 convs where the config asks for linear (or reverse)
            if k.endswith(("proj_in.weight", "proj_out.weight")) and k in own and v.shape != own[k].shape \
                    and v.numel() == own[k].numel():
                sd[k] = v.reshape(own[k].shape)
    load_state_dict_strict(model, sd, str(path))


def load_single_file(cls, path, config=None, unet=None, allow_pickle: bool = False):
    """Model from one file; config from ``config``, else ``unet`` (via from_unet rules), else SD1.5 defaults."""
    if not Path(path).is_file() or (Path(path).suffix != ".safetensors" and not allow_pickle):
        read_state_dict(path, allow_pickle)  # raises (missing / pickle without opt-in) before building a big model
    if config is None and unet is not None:
        config = config_from_unet(unet.config)
    model = cls.from_config(config if config is not None else ControlNetConfig(cross_attention_dim=768))
    load_weights_file(model, path, allow_pickle)
    return model
