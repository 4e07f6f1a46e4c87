"""Text + condition image sampling for Stable Diffusion 3 with SD3 ControlNet(s) (Esser et al. 2024; Zhang et al. 2023).

    pipe = SD3ControlNetPipeline.from_pretrained("models/tiny-sd3", controlnet="models/tiny-sd3-controlnet")
    images = pipe("red circle with blue background", edge_image, sampler="flow_euler", steps=28, seed=0).images

Rectified flow with velocity prediction: the schedule (RectifiedFlow with the scheduler's shift), the prediction
kind and the time signal (1000 t) are read from scheduler/ by diffusion.interop, so every sampler and time grid of
diffusion.sample runs the MM-DiT (the default grid is the SD3-shifted one). Text: both CLIP encoders' penultimate
states concatenated and zero-padded to the T5 width, followed by the T5 states (zeros without text_encoder_3, as SD3
allows); pooled: both CLIP projections concatenated. Condition images go through the VAE as diffusers does:
encoded (a posterior sample drawn from generators seeded by each sample's seed), shifted and scaled (no shift for a
ControlNet with force_zeros_for_pooled_projection, which also gets zero pooled text), then patch-embedded by each
SD3ControlNetModel, whose block residuals (summed over several ControlNets) go to diffusers' SD3Transformer2DModel.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from diffusion.interop import load_scheduler_config
from diffusion.models.latents import VAEScaling

from .dit_controlnet import per_net
from .pipeline import ControlNetPipeline, check_pipeline_dir, read_model_index, token_ids

__all__ = ["SD3ControlNetPipeline", "ControlledSD3Transformer", "load_sd3_components"]

SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _nets(controlnet) -> list:
    if controlnet is None:
        return []
    return list(controlnet) if isinstance(controlnet, (list, tuple, nn.ModuleList)) else [controlnet]


def condition_generators(generator, index: int = 0):
    """Generators for condition k's VAE posterior noise, seeded by a fixed mix of each sample generator's seed
    (initial_seed) and k: a sample's condition depends on its seed only, and drawing it leaves the prior / sampler
    noise streams untouched (diffusers draws it from the global RNG). None (no seed): the global RNG."""
    if generator is None:
        return None
    many = isinstance(generator, (list, tuple))
    out = [torch.Generator(g.device).manual_seed((g.initial_seed() * 0x9E3779B97F4A7C15 + 2 * index + 1) % 2 ** 64)
           for g in (generator if many else [generator])]
    return out if many else out[0]


class ControlledSD3Transformer(nn.Module):
    """diffusers' SD3Transformer2DModel steered by SD3ControlNetModel(s), called as net(x, timestep, **cond).

    Each ControlNet sees the noisy latents, the timestep, the text states (none for a ControlNet without
    joint_attention_dim, SD3.5-style) and the pooled text (zeros when its force_zeros_for_pooled_projection is set);
    its block residuals, scaled by conditioning_scale, are summed over the ControlNets and passed to the transformer
    as block_controlnet_hidden_states. controlnet_cond=None runs the bare transformer."""

    def __init__(self, transformer: nn.Module, controlnet=None):
        super().__init__()
        self.transformer = transformer
        self.controlnets = nn.ModuleList(_nets(controlnet))

    @property
    def config(self):
        return self.transformer.config

    def block_residuals(self, x, timestep, encoder_hidden_states, pooled_projections, controlnet_cond,
                        conditioning_scale=1.0) -> list:
        n = len(self.controlnets)
        total = None
        for net, cond, scale in zip(self.controlnets, per_net(controlnet_cond, n, "controlnet_cond"),
                                    per_net(conditioning_scale, n, "conditioning_scale")):
            cfg = net.config
            pooled = torch.zeros_like(pooled_projections) if cfg.force_zeros_for_pooled_projection \
                else pooled_projections
            res = net(hidden_states=x, controlnet_cond=cond, conditioning_scale=scale, timestep=timestep,
                      encoder_hidden_states=encoder_hidden_states if cfg.joint_attention_dim is not None else None,
                      pooled_projections=pooled, return_dict=False)[0]
            total = list(res) if total is None else [a + b for a, b in zip(total, res)]
        return total

    def forward(self, x: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, controlnet_cond=None, conditioning_scale=1.0) -> torch.Tensor:
        """x (B,C,h,w) latents, timestep (B,) = 1000 t, encoder_hidden_states (B,L,D), pooled (B,P) -> velocity."""
        res = None
        if controlnet_cond is not None and len(self.controlnets):
            res = self.block_residuals(x, timestep, encoder_hidden_states, pooled_projections, controlnet_cond,
                                       conditioning_scale)
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, block_controlnet_hidden_states=res,
                                return_dict=False)[0]


def load_sd3_components(path, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """The parts of a local StableDiffusion3Pipeline directory (offline); text_encoder_3 / tokenizer_3 are None
    when model_index.json lists them as null (SD3 without T5)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    path = check_pipeline_dir(path, SD3_COMPONENTS, "SD3", "StableDiffusion3Pipeline", "make_tiny_sd3.py",
                              note=" (+ text_encoder_3/, tokenizer_3/ for T5)")
    index = read_model_index(path)
    with_t5 = (index.get("text_encoder_3") or [None])[0] is not None and (path / "text_encoder_3").is_dir()
    kw = dict(local_files_only=True)
    parts = dict(
        transformer=SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype,
                                                                   **kw))
    if with_t5:
        parts["text_encoder_3"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype, **kw)
    parts = {k: v.to(device).eval() for k, v in parts.items()}
    return dict(parts, text_encoder_3=parts.get("text_encoder_3"),
                tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
                tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
                tokenizer_3=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **kw) if with_t5 else None,
                scheduler_config=load_scheduler_config(path))


def _as_sd3_controlnet(obj, transformer, dtype, device):
    """An SD3ControlNetModel from a directory or object; SD3.5-style ones without their own position embedding
    take the transformer's (as diffusers' pipeline does)."""
    from diffusers import SD3ControlNetModel

    if isinstance(obj, (str, os.PathLike)):
        cfg = Path(obj) / "config.json"
        name = json.loads(cfg.read_text()).get("_class_name") if cfg.is_file() else None
        if name not in (None, "SD3ControlNetModel"):
            raise ValueError(f"{obj} holds a {name}, not an SD3ControlNetModel (SD3 pipelines take SD3 ControlNets)")
        obj = SD3ControlNetModel.from_pretrained(obj, local_files_only=True, torch_dtype=dtype)
    if not isinstance(obj, SD3ControlNetModel):
        raise ValueError(f"SD3 pipelines take diffusers SD3ControlNetModel(s), got {type(obj).__name__}")
    if getattr(obj.config, "use_pos_embed", True) is False:
        obj.pos_embed = obj._get_pos_embed_from_transformer(transformer)
    return (obj if obj.dtype == dtype else obj.to(dtype=dtype)).to(device).eval()


class SD3ControlNetPipeline(ControlNetPipeline):
    """Frozen SD3 transformer + VAE + CLIP / CLIP / optional T5 encoders, optional SD3 ControlNet(s), any sampler."""

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config: dict,
                 controlnet=None, text_encoder_3=None, tokenizer_3=None):
        self.transformer = transformer
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self._init_common(vae, scheduler_config, controlnet)
        self.pixel_multiple = self.vae_scale * transformer.config.patch_size

    @classmethod
    def from_pretrained(cls, path, controlnet=None, dtype: torch.dtype = torch.float32, device="cpu"):
        """Load a local StableDiffusion3Pipeline directory; `controlnet`: an SD3ControlNetModel, a directory, or a
        list of them."""
        c = load_sd3_components(path, dtype=dtype, device=device)
        nets = [_as_sd3_controlnet(n, c["transformer"], dtype, device) for n in _nets(controlnet)]
        return cls(c["transformer"], c["vae"], c["text_encoder"], c["text_encoder_2"], c["tokenizer"],
                   c["tokenizer_2"], c["scheduler_config"], (nets[0] if len(nets) == 1 else nets) or None,
                   c["text_encoder_3"], c["tokenizer_3"])

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    @torch.no_grad()
    def encode_prompt(self, prompts, max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77 + max_sequence_length, D_T5) text states and (B, P1 + P2) pooled text (Esser et al. 2024, Sec. 5.2:
        CLIP states zero-padded to the T5 width, then the T5 states; zeros in place of T5 without text_encoder_3)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states, pooled = [], []
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = token_ids(tok, prompts, self.tokenizer.model_max_length)  # both at the first's length (SD3)
            out = enc(ids.to(enc.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(prompts), max_sequence_length, self.transformer.config.joint_attention_dim)
        else:
            ids = token_ids(self.tokenizer_3, prompts, max_sequence_length)
            t5 = self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].to(clip.dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def text_conditions(self, prompts, negative_prompts, n, height, width,
                        max_sequence_length: int = 256) -> tuple[dict, dict]:
        """encoder_hidden_states + pooled_projections for both CFG branches (negative prompt None: "")."""
        def branch(texts):
            states, pooled = self.encode_prompt(texts, max_sequence_length)
            return {"encoder_hidden_states": states.repeat_interleave(n, 0).to(self.dtype),
                    "pooled_projections": pooled.repeat_interleave(n, 0).to(self.dtype)}

        return branch(prompts), branch([p or "" for p in negative_prompts])

    @torch.no_grad()
    def encode_condition(self, pixels: torch.Tensor, controlnet, generator=None) -> torch.Tensor:
        """Condition images in [0, 1] -> ControlNet input latents (z - shift) * scale, z a VAE posterior sample
        (diffusers' SD3 ControlNet pipeline and training script); shift 0 for a ControlNet with
        force_zeros_for_pooled_projection, as diffusers."""
        scaling = VAEScaling.of(self.vae)
        if controlnet.config.force_zeros_for_pooled_projection:
            scaling = replace(scaling, shift=0.0)
        z = self.vae.encode((2 * pixels - 1).to(self.vae.dtype)).latent_dist.sample(generator)
        return scaling.normalize(z).to(self.dtype)

    def control_conditions(self, image, batch, height, width, generator=None):
        """Condition latents per ControlNet; the posterior noise of ControlNet k comes from generators seeded from
        each sample generator's seed and k (condition_generators), not from the sampler's noise streams."""
        pixels = super().control_conditions(image, batch, height, width)
        nets = _nets(self.controlnet)
        latents = [self.encode_condition(p, net, condition_generators(generator, k))
                   for k, (p, net) in enumerate(zip(per_net(pixels, len(nets), "image"), nets))]
        return latents if isinstance(self.controlnet, (list, tuple)) else latents[0]

    def network(self, conditioning_scale=1.0, guess_mode: bool = False, guess_mode_scales: str = "diffusers",
                only_mid_control: bool = False) -> tuple:
        if guess_mode or only_mid_control:
            raise ValueError("guess_mode and only_mid_control are UNet ControlNet options; SD3 ControlNets have "
                             "neither (nor has diffusers' StableDiffusion3ControlNetPipeline): drop them")
        extra = {} if self.controlnet is None else dict(conditioning_scale=conditioning_scale)
        return ControlledSD3Transformer(self.transformer, self.controlnet), extra

    @torch.no_grad()
    def __call__(self, prompt, image=None, negative_prompt=None, *, max_sequence_length: int = 256,
                 guidance_scale: float = 7.0, sampler: str = "flow_euler", steps: int = 28,
                 controlnet_conditioning_scale: Union[float, Sequence[float]] = 1.0, **kwargs):
        """ControlNetPipeline.__call__ (same arguments and outputs; default sampler flow_euler on the shifted grid,
        28 steps, CFG 7, as SD3) plus max_sequence_length, the T5 token count."""
        return super().__call__(prompt, image, negative_prompt, guidance_scale=guidance_scale, sampler=sampler,
                                steps=steps, controlnet_conditioning_scale=controlnet_conditioning_scale,
                                text_options=dict(max_sequence_length=max_sequence_length), **kwargs)
