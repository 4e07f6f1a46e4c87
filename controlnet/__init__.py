"""ControlNet for diffusers UNets (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models")."""
from .canny import canny, edge_f1
from .config import ControlNetConfig, config_from_unet
from .controlled import ControlledUNet, MultiControlNet
from .convert import diffusers_to_original, original_to_diffusers
from .io import read_state_dict
from .model import ControlNet, ControlNetResiduals, HintEncoder

__all__ = ["ControlNet", "ControlNetConfig", "ControlNetResiduals", "ControlledUNet", "HintEncoder",
           "MultiControlNet", "config_from_unet", "diffusers_to_original", "original_to_diffusers",
           "read_state_dict", "canny", "edge_f1"]


# DiT / SD3 MM-DiT ControlNet
from .dit_controlnet import ControlledTransformer, DiTControlNet, map_residuals  # noqa: E402

__all__ += ["ControlledTransformer", "DiTControlNet", "map_residuals"]
