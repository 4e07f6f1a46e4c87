"""ControlNet: a trainable copy of a UNet encoder joined by zero convolutions (Zhang, Rao & Agrawala 2023)."""
from __future__ import annotations

import json
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import (TextImageProjection, TextImageTimeEmbedding, TextTimeEmbedding,
                                         TimestepEmbedding, Timesteps)
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UNetMidBlock2DCrossAttn, get_down_block

from diffusion.models.pretrained import PretrainedModel

from .config import ControlNetConfig, config_from_unet



CHECKPOINT_GRANULARITIES = ("resnet", "block")


def _checkpoint_call(module, *args):
    """The diffusers blocks' checkpoint function: recompute `module` in backward (non-reentrant)."""
    return checkpoint(module.__call__, *args, use_reentrant=False)

def zero_conv(channels: int) -> nn.Conv2d:
    """1x1 convolution with weight and bias initialised to zero (the paper's "zero convolution")."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


GUESS_MODE_SCALES = ("diffusers", "original")


def guess_mode_weights(n: int, kind: str = "diffusers") -> torch.Tensor:
    """Guess-mode weights of the n residuals (skips shallow to deep, then mid), float64: "diffusers" is
    logspace(-1, 0, n) (0.1 ... 1), "original" is lllyasviel's cldm.py 0.825 ** (n - 1 - i) (0.825^12 ... 1 for n = 13)."""
    if kind not in GUESS_MODE_SCALES:
        raise ValueError(f"unknown guess_mode_scales {kind!r}; valid: {', '.join(GUESS_MODE_SCALES)}")
    if kind == "diffusers":
        return torch.logspace(-1, 0, n, dtype=torch.float64)
    return torch.tensor([0.825 ** float(n - 1 - i) for i in range(n)], dtype=torch.float64)


class ControlNetResiduals(NamedTuple):
    """Residuals for the UNet skip connections and mid block; unpacks like diffusers' ``return_dict=False`` tuple."""

    down_block_res_samples: tuple
    mid_block_res_sample: torch.Tensor


class HintEncoder(nn.Module):
    """Condition-image encoder E(.) of Zhang et al. 2023: 3x3 convs + SiLU, stride 2 at each width change."""

    def __init__(self, in_channels: int = 3, out_channels: int = 320, widths: Sequence[int] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(w_in, w_in, 3, padding=1), nn.Conv2d(w_in, w_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero output: a fresh ControlNet leaves the UNet untouched
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(PretrainedModel):
    """ControlNet for diffusers' UNet2DConditionModel (Zhang, Rao & Agrawala 2023), a diffusers ModelMixin whose
    config and state dict are exactly diffusers' ``ControlNetModel``'s: ``save_pretrained`` writes a directory
    ``diffusers.ControlNetModel.from_pretrained`` reads, and ``from_pretrained`` reads either's directories.

    Args: those of ``diffusers.ControlNetModel`` (same names and defaults); ``self.spec`` is the validated
    ``ControlNetConfig`` view of ``self.config`` with the derived sizes (per-block values, hint downscale).
    """

    config_class_names = ("ControlNetModel",)
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 4, conditioning_channels: int = 3, flip_sin_to_cos: bool = True,
                 freq_shift: int = 0,
                 down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn",
                 only_cross_attention: Union[bool, tuple] = False,
                 block_out_channels: tuple = (320, 640, 1280, 1280), layers_per_block: int = 2,
                 downsample_padding: int = 1, mid_block_scale_factor: float = 1, act_fn: str = "silu",
                 norm_num_groups: Optional[int] = 32, norm_eps: float = 1e-5, cross_attention_dim: int = 1280,
                 transformer_layers_per_block: Union[int, tuple] = 1, encoder_hid_dim: Optional[int] = None,
                 encoder_hid_dim_type: Optional[str] = None, attention_head_dim: Union[int, tuple] = 8,
                 num_attention_heads: Optional[Union[int, tuple]] = None, use_linear_projection: bool = False,
                 class_embed_type: Optional[str] = None, addition_embed_type: Optional[str] = None,
                 addition_time_embed_dim: Optional[int] = None, num_class_embeds: Optional[int] = None,
                 upcast_attention: bool = False, resnet_time_scale_shift: str = "default",
                 projection_class_embeddings_input_dim: Optional[int] = None,
                 controlnet_conditioning_channel_order: str = "rgb",
                 conditioning_embedding_out_channels: tuple = (16, 32, 96, 256),
                 global_pool_conditions: bool = False, addition_embed_type_num_heads: int = 64):
        super().__init__()
        if isinstance(in_channels, (ControlNetConfig, dict)):
            raise TypeError("ControlNet(config) takes keyword arguments; build from a ControlNetConfig or a config "
                            "dict with ControlNet.from_config(config)")
        # register_to_config has stored the arguments in self.config; validate them once, typed
        self.spec = c = ControlNetConfig.from_dict({k: v for k, v in self.config.items() if not k.startswith("_")})
        self.gradient_checkpointing = False
        n, ch0, temb = len(c.down_block_types), c.block_out_channels[0], c.time_embed_dim
        heads = c.per_block("num_attention_heads" if c.num_attention_heads is not None else "attention_head_dim")
        head_dims, t_layers = c.per_block("attention_head_dim"), c.per_block("transformer_layers_per_block")
        xattn_only = c.per_block("only_cross_attention")

        # Copied UNet input stem and embeddings (names as in UNet2DConditionModel / ControlNetModel).
        self.conv_in = nn.Conv2d(c.in_channels, ch0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch0, c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch0, temb, act_fn=c.act_fn)
        self.encoder_hid_proj = None
        if c.encoder_hid_dim_type == "text_proj":
            self.encoder_hid_proj = nn.Linear(c.encoder_hid_dim, c.cross_attention_dim)
        elif c.encoder_hid_dim_type == "text_image_proj":
            self.encoder_hid_proj = TextImageProjection(c.encoder_hid_dim, c.cross_attention_dim, c.cross_attention_dim)
        elif c.encoder_hid_dim_type is not None:
            raise ValueError(f"unsupported encoder_hid_dim_type {c.encoder_hid_dim_type!r}")
        self.class_embedding = self._make_class_embedding(c, ch0, temb)
        if c.addition_embed_type == "text":
            self.add_embedding = TextTimeEmbedding(c.encoder_hid_dim or c.cross_attention_dim, temb,
                                                   num_heads=c.addition_embed_type_num_heads)
        elif c.addition_embed_type == "text_image":
            self.add_embedding = TextImageTimeEmbedding(c.cross_attention_dim, c.cross_attention_dim, temb)
        elif c.addition_embed_type == "text_time":  # SDXL: pooled text + micro-conditioning time ids
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        elif c.addition_embed_type is not None:
            raise ValueError(f"unsupported addition_embed_type {c.addition_embed_type!r}")

        self.controlnet_cond_embedding = HintEncoder(c.conditioning_channels, ch0, c.conditioning_embedding_out_channels)

        # Encoder copy; one zero conv per UNet skip tensor (stem, every resnet layer, every downsampler).
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(ch0)])
        prev = ch0
        for i, kind in enumerate(c.down_block_types):
            out = c.block_out_channels[i]
            block = get_down_block(
                kind, num_layers=c.layers_per_block, transformer_layers_per_block=t_layers[i], in_channels=prev,
                out_channels=out, temb_channels=temb, add_downsample=i < n - 1, resnet_eps=c.norm_eps,
                resnet_act_fn=c.act_fn, resnet_groups=c.norm_num_groups, cross_attention_dim=c.cross_attention_dim,
                num_attention_heads=heads[i], attention_head_dim=head_dims[i] or out,
                downsample_padding=c.downsample_padding, use_linear_projection=c.use_linear_projection,
                only_cross_attention=xattn_only[i], upcast_attention=c.upcast_attention,
                resnet_time_scale_shift=c.resnet_time_scale_shift)
            self.down_blocks.append(block)
            n_skips = len(block.resnets) + (len(block.downsamplers) if block.downsamplers is not None else 0)
            self.controlnet_down_blocks.extend(zero_conv(out) for _ in range(n_skips))
            prev = out

        mid_ch = c.block_out_channels[-1]
        self.controlnet_mid_block = zero_conv(mid_ch)
        common = dict(in_channels=mid_ch, temb_channels=temb, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                      output_scale_factor=c.mid_block_scale_factor, resnet_groups=c.norm_num_groups,
                      resnet_time_scale_shift=c.resnet_time_scale_shift)
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                transformer_layers_per_block=t_layers[-1], cross_attention_dim=c.cross_attention_dim,
                num_attention_heads=heads[-1], use_linear_projection=c.use_linear_projection,
                upcast_attention=c.upcast_attention, **common)
        else:  # same shape as the UNet's attention-free mid block
            self.mid_block = UNetMidBlock2D(num_layers=0, add_attention=False, **common)

    @staticmethod
    def _make_class_embedding(c: ControlNetConfig, ch0: int, temb: int) -> Optional[nn.Module]:
        if c.class_embed_type is None and c.num_class_embeds is not None:
            return nn.Embedding(c.num_class_embeds, temb)
        if c.class_embed_type == "timestep":
            return TimestepEmbedding(ch0, temb, act_fn=c.act_fn)
        if c.class_embed_type == "identity":
            return nn.Identity()
        if c.class_embed_type == "projection":
            if c.projection_class_embeddings_input_dim is None:
                raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim")
            return TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        if c.class_embed_type is not None:
            raise ValueError(f"unsupported class_embed_type {c.class_embed_type!r}")
        return None

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_unet(cls, unet: nn.Module, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True) -> "ControlNet":
        """ControlNet initialised as in Zhang et al. 2023: encoder = copy of ``unet``'s, new layers zero."""
        net = cls.from_config(config_from_unet(unet.config, conditioning_channels, conditioning_embedding_out_channels))
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "encoder_hid_proj", "class_embedding", "add_embedding",
                         "down_blocks", "mid_block"):
                mine = getattr(net, name, None)
                if mine is not None:
                    mine.load_state_dict(getattr(unet, name).state_dict())
        p = next(unet.parameters())
        return net.to(device=p.device, dtype=p.dtype)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config`` (a config dict, e.g. a ControlNetModel's); also takes a ``ControlNetConfig``."""
        if isinstance(config, ControlNetConfig):
            config = config.to_dict()
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        """config.json under diffusers' class name ``ControlNetModel`` (same keys): diffusers loads our directories."""
        return json.dumps({**json.loads(super().to_json_string()), "_class_name": "ControlNetModel"}, indent=2,
                          sort_keys=True) + "\n"

    @classmethod
    def from_single_file(cls, path, config=None, unet=None, allow_pickle: bool = False) -> "ControlNet":
        """Load one weights file, diffusers layout or the original lllyasviel ``control_model.*`` layout."""
        from .io import load_single_file
        return load_single_file(cls, path, config=config, unet=unet, allow_pickle=allow_pickle)

    def load_weights(self, path, allow_pickle: bool = False) -> "ControlNet":
        """Strictly load a weights file (either layout) into this model."""
        from .io import load_weights_file
        load_weights_file(self, path, allow_pickle=allow_pickle)
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True, granularity: str = "resnet") -> None:
        """Recompute activations in backward instead of storing them. "resnet" (default): each resnet, by the down /
        mid blocks' own checkpointing, as diffusers' ControlNetModel (the same step time), and the hint encoder
        (full-resolution activations, ~100 MB at 512 px, for a negligible recomputation); "block": the hint encoder
        and whole down / mid blocks, attention included (far fewer saved activations, a 2-3% slower step at SD1.5
        size; docs/controlnet.md, "Memory")."""
        if granularity not in CHECKPOINT_GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(CHECKPOINT_GRANULARITIES)}")
        self.gradient_checkpointing = enabled
        self.checkpoint_blocks = enabled and granularity == "block"
        for block in [*self.down_blocks, self.mid_block]:
            if block is not None and hasattr(block, "gradient_checkpointing"):
                block.gradient_checkpointing = enabled and granularity == "resnet"
                block._gradient_checkpointing_func = _checkpoint_call

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)

    # ---- forward -----------------------------------------------------------------------------------------
    def _run(self, fn, *args, **kwargs):
        if getattr(self, "checkpoint_blocks", False) and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def check_inputs(self, sample: torch.Tensor, controlnet_cond: torch.Tensor,
                     resize_condition: bool = False) -> torch.Tensor:
        """Validate shapes; returns the condition (resized with a warning when ``resize_condition``)."""
        c = self.spec
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be (B, {c.in_channels}, h, w) latents, got {tuple(sample.shape)}")
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[1] != c.conditioning_channels:
            raise ValueError(f"controlnet_cond must have {c.conditioning_channels} channels (B, "
                             f"{c.conditioning_channels}, H, W), got {tuple(controlnet_cond.shape)}")
        f = c.hint_downscale
        expected = (sample.shape[2] * f, sample.shape[3] * f)
        if tuple(controlnet_cond.shape[2:]) != expected:
            msg = (f"controlnet_cond spatial size {tuple(controlnet_cond.shape[2:])} != expected {expected} "
                   f"({f}x the latent size {tuple(sample.shape[2:])})")
            if not resize_condition:
                raise ValueError(msg + "; resize the condition image or pass resize_condition=True")
            warnings.warn(msg + "; resizing (bilinear)", stacklevel=3)
            controlnet_cond = F.interpolate(controlnet_cond, size=expected, mode="bilinear", align_corners=False)
        b = sample.shape[0]
        if controlnet_cond.shape[0] == 1 and b > 1:
            controlnet_cond = controlnet_cond.expand(b, -1, -1, -1)
        elif controlnet_cond.shape[0] != b:
            raise ValueError(f"controlnet_cond batch {controlnet_cond.shape[0]} != sample batch {b} (or 1)")
        return controlnet_cond

    def embed(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
              added_cond_kwargs=None):
        """Time (+ class / added) embedding and projected text states, with the UNet's semantics."""
        c, added = self.spec, added_cond_kwargs or {}
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64, device=sample.device)
        elif t.ndim == 0:
            t = t[None].to(sample.device)
        t = t.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this ControlNet has a class embedding: pass class_labels")
            if c.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(sample.dtype)
            emb = emb + self.class_embedding(class_labels).to(sample.dtype)
        aug = None
        if c.addition_embed_type == "text":
            aug = self.add_embedding(encoder_hidden_states)
        elif c.addition_embed_type == "text_image":
            aug = self.add_embedding(added.get("text_embeds", encoder_hidden_states), added["image_embeds"])
        elif c.addition_embed_type == "text_time":
            missing = [k for k in ("text_embeds", "time_ids") if k not in added]
            if missing:
                raise ValueError(f"addition_embed_type='text_time' (SDXL) needs added_cond_kwargs {missing}")
            text = added["text_embeds"]
            time = self.add_time_proj(added["time_ids"].flatten()).reshape(text.shape[0], -1)
            aug = self.add_embedding(torch.cat([text, time], dim=-1).to(emb.dtype))
        if aug is not None:
            emb = emb + aug
        if c.encoder_hid_dim_type == "text_proj":
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        elif c.encoder_hid_dim_type == "text_image_proj":
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states, added["image_embeds"])
        return emb, encoder_hidden_states

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0, guess_mode: bool = False,
                guess_mode_scales: str = "diffusers", added_cond_kwargs: Optional[dict] = None,
                class_labels: Optional[torch.Tensor] = None,
                timestep_cond: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cross_attention_kwargs: Optional[dict] = None, resize_condition: bool = False,
                return_dict: bool = False) -> ControlNetResiduals:
        """Residuals ``(down_block_res_samples, mid_block_res_sample)`` for the UNet's skips and mid block.

        guess_mode weighs residual i by ``guess_mode_weights(n, guess_mode_scales)[i]``: "diffusers" (logspace) or
        "original" (lllyasviel's 0.825 ** (n - 1 - i))."""
        c = self.spec
        cond = self.check_inputs(sample, controlnet_cond, resize_condition)
        text_dim = c.encoder_hid_dim if c.encoder_hid_dim_type else c.cross_attention_dim
        if torch.is_tensor(encoder_hidden_states) and encoder_hidden_states.shape[-1] != text_dim:
            raise ValueError(f"encoder_hidden_states must have {text_dim} features in the last dimension, "
                             f"got shape {tuple(encoder_hidden_states.shape)}")
        if c.controlnet_conditioning_channel_order == "bgr":
            cond = torch.flip(cond, dims=[1])
        if attention_mask is not None:  # keep-mask -> additive bias, as the UNet does
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        emb, ehs = self.embed(sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                              added_cond_kwargs)

        hint = checkpoint(self.controlnet_cond_embedding, cond, use_reentrant=False) \
            if self.gradient_checkpointing and torch.is_grad_enabled() else self.controlnet_cond_embedding(cond)
        h = self.conv_in(sample) + hint
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = self._run(block, h, emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                                   cross_attention_kwargs=cross_attention_kwargs)
            else:
                h, res = self._run(block, h, emb)
            skips.extend(res)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self._run(self.mid_block, h, emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                          cross_attention_kwargs=cross_attention_kwargs)
        else:
            h = self._run(self.mid_block, h, emb)

        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not c.global_pool_conditions:
            # Guess mode: deeper residuals weigh more (diffusers' logspace 0.1 -> 1, or the original 0.825 ** k)
            scales = (guess_mode_weights(len(down) + 1, guess_mode_scales) * conditioning_scale).tolist()
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if c.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlNetResiduals(tuple(down), mid)
