"""ControlNet for diffusers UNets (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

Names load on first use (PEP 562), so `import controlnet.cli` (cn-sample --help) does not import torch.
"""
import importlib

from .canny import canny, edge_f1  # eager (numpy + cv2, ~0.1 s): the function must shadow the submodule `canny`

_EXPORTS = {
    "ControlNetConfig": "config", "config_from_unet": "config",
    "ControlledUNet": "controlled", "MultiControlNet": "controlled",
    "diffusers_to_original": "convert", "original_to_diffusers": "convert",
    "read_state_dict": "io",
    "ControlNet": "model", "ControlNetResiduals": "model", "HintEncoder": "model",
    # DiT / SD3 MM-DiT ControlNet
    "ControlledTransformer": "dit_controlnet", "DiTControlNet": "dit_controlnet", "map_residuals": "dit_controlnet",
}
__all__ = ["canny", "edge_f1", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
