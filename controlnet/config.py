"""ControlNet configuration (Zhang, Rao & Agrawala 2023), stored with diffusers' ControlNetModel config.json keys."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

IntOrSeq = Union[int, Sequence[int]]

# Down/mid block kinds our encoder copy supports (the ones SD 1.x / 2.x / XL use; same set diffusers' ControlNet runs).
SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclass
class ControlNetConfig:
    """Hyper-parameters of a ControlNet; field names equal diffusers' ``ControlNetModel.__init__`` arguments."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    only_cross_attention: Union[bool, tuple] = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrSeq = 1
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    attention_head_dim: IntOrSeq = 8
    num_attention_heads: Optional[IntOrSeq] = None
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    num_class_embeds: Optional[int] = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: Optional[int] = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # unknown keys kept for round-trips

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON gives lists; keep tuples so configs compare equal
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
            self.encoder_hid_dim_type = "text_proj"  # same default diffusers applies
        n = len(self.down_block_types)
        if len(self.block_out_channels) != n:
            raise ValueError(f"block_out_channels {self.block_out_channels} must have one entry per down block ({n})")
        bad = [t for t in self.down_block_types if t not in SUPPORTED_DOWN_BLOCKS]
        if bad:
            raise ValueError(f"unsupported down_block_types {bad}; supported: {SUPPORTED_DOWN_BLOCKS}")
        if self.mid_block_type not in SUPPORTED_MID_BLOCKS:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; supported: {SUPPORTED_MID_BLOCKS}")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("controlnet_conditioning_channel_order must be 'rgb' or 'bgr'")

    # ---- derived quantities -------------------------------------------------------------------------
    def per_block(self, name: str) -> tuple:
        """Broadcast an int/bool-or-sequence field to one value per down block."""
        v = getattr(self, name)
        n = len(self.down_block_types)
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
        if len(v) != n:
            raise ValueError(f"{name}={v} must have one entry per down block ({n})")
        return v

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def hint_downscale(self) -> int:
        """Ratio between condition-image and latent resolution (8 for the default hint encoder)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    # ---- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        if extra:
            warnings.warn(f"ignoring unknown ControlNet config keys {sorted(extra)}")
        return cls(**known, extra=extra)


# UNet2DConditionModel options the ControlNet encoder copy cannot reproduce, with their neutral value.
_UNET_NEUTRAL: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "class_embeddings_concat": False,
    "attention_type": "default",
    "dual_cross_attention": False,
}


def hint_widths(vae_factor: int) -> tuple[int, ...]:
    """Condition-encoder widths that downsample by the VAE's factor, 2^(len - 1) = vae_factor (SD's (16, 32, 96, 256)
    for 8)."""
    widths = {1: (16,), 2: (16, 32), 4: (16, 32, 64), 8: (16, 32, 96, 256)}
    if vae_factor not in widths:
        raise ValueError(f"no condition-encoder widths for a VAE downsampling factor of {vae_factor} (valid: 1, 2, 4, "
                         f"8); start from a ControlNet built for this base with --controlnet_model_name_or_path")
    return widths[vae_factor]


def config_from_unet(unet_config: Any, conditioning_channels: int = 3,
                     conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)) -> ControlNetConfig:
    """ControlNet config whose encoder mirrors a diffusers ``UNet2DConditionModel`` config."""
    get = (lambda k, d=None: unet_config.get(k, d)) if isinstance(unet_config, dict) else \
        (lambda k, d=None: getattr(unet_config, k, d))
    for key, neutral in _UNET_NEUTRAL.items():
        if get(key, neutral) != neutral:
            raise ValueError(f"UNet option {key}={get(key)!r} is not supported by ControlNet.from_unet "
                             f"(only {neutral!r})")
    if not isinstance(get("layers_per_block", 2), int):
        raise ValueError("ControlNet.from_unet needs an int layers_per_block, got " + repr(get("layers_per_block")))
    if not isinstance(get("cross_attention_dim", 1280), int):
        raise ValueError("ControlNet.from_unet needs an int cross_attention_dim")
    if get("encoder_hid_dim_type") not in (None, "text_proj", "text_image_proj"):
        raise ValueError(f"unsupported UNet encoder_hid_dim_type {get('encoder_hid_dim_type')!r}")
    if get("addition_embed_type") not in (None, "text", "text_image", "text_time"):
        raise ValueError(f"unsupported UNet addition_embed_type {get('addition_embed_type')!r}")
    if get("class_embed_type") not in (None, "timestep", "identity", "projection"):
        raise ValueError(f"unsupported UNet class_embed_type {get('class_embed_type')!r}")
    names = [f.name for f in dataclasses.fields(ControlNetConfig) if f.name != "extra"]
    kwargs = {k: get(k) for k in names if get(k, _MISSING) is not _MISSING}
    kwargs.update(conditioning_channels=conditioning_channels,
                  conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
    kwargs.pop("controlnet_conditioning_channel_order", None)
    kwargs.pop("global_pool_conditions", None)
    return ControlNetConfig(**kwargs)


_MISSING = object()

# Keys that decide whether a ControlNet's inputs and residuals fit a UNet.
STRUCTURE_KEYS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "mid_block_type",
                  "cross_attention_dim", "addition_embed_type", "class_embed_type", "encoder_hid_dim")


def unet_mismatches(controlnet: ControlNetConfig, unet_config: Any) -> list[str]:
    """'key: ControlNet value vs UNet value' for every STRUCTURE_KEYS entry where `controlnet` does not fit the UNet."""
    ref = config_from_unet(unet_config)
    return [f"{k}: ControlNet {getattr(controlnet, k)!r} vs UNet {getattr(ref, k)!r}" for k in STRUCTURE_KEYS
            if getattr(controlnet, k) != getattr(ref, k)]
