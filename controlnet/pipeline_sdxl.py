"""Text + condition image sampling for SDXL with ControlNet(s) (Podell et al. 2023; Zhang et al. 2023).

    pipe = SDXLControlNetPipeline.from_pretrained("models/tiny-sdxl", controlnet="models/tiny-sdxl-controlnet")
    images = pipe("red circle with blue background", edge_image, sampler="dpmpp_2m", steps=20, seed=0,
                  original_size=(1024, 1024), crops_coords_top_left=(0, 0)).images

The SD pipeline (controlnet.pipeline.ControlNetPipeline) with SDXL's text side: two CLIP text encoders whose
penultimate hidden states are concatenated (the UNet's encoder_hidden_states), the second one's projected pooled
output (added_cond_kwargs["text_embeds"]) and the micro-conditioning add_time_ids (original_size,
crops_coords_top_left, target_size; Podell et al. 2023, Sec. 2.2). The UNet + ControlNet(s), CFG, guess mode and any
sampler of diffusion.sample are the SD pipeline's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from diffusion.interop import load_scheduler_config

from .pipeline import ControlNetPipeline, check_pipeline_dir, load_controlnets, read_model_index, token_ids

__all__ = ["SDXLControlNetPipeline", "load_sdxl_components"]

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def load_sdxl_components(path, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """The parts of a local StableDiffusionXLPipeline directory (offline) and its force_zeros_for_empty_prompt."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = check_pipeline_dir(path, SDXL_COMPONENTS, "SDXL", "StableDiffusionXLPipeline", "make_tiny_sdxl.py")
    kw = dict(local_files_only=True)
    index = read_model_index(path)
    parts = dict(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **kw))
    parts = {k: v.to(device).eval() for k, v in parts.items()}
    return dict(parts, tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
                tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
                scheduler_config=load_scheduler_config(path),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))


def _pair(value, name: str) -> tuple:
    if value is None or len(value) != 2 or any(not isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{name} must be a (height, width) / (top, left) pair of numbers, got {value!r}")
    return tuple(value)


class SDXLControlNetPipeline(ControlNetPipeline):
    """Frozen SDXL UNet + VAE + two CLIP text encoders, optional ControlNet(s), any sampler of diffusion.sample."""

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config: dict,
                 controlnet=None, force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config, controlnet)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        cfg = unet.config
        want = 6 * (cfg.addition_time_embed_dim or 0) + text_encoder_2.config.projection_dim
        if cfg.addition_embed_type != "text_time" or cfg.projection_class_embeddings_input_dim != want:
            raise ValueError(f"the UNet is not an SDXL base UNet for these text encoders: addition_embed_type "
                             f"{cfg.addition_embed_type!r} (need 'text_time'), projection_class_embeddings_input_dim "
                             f"{cfg.projection_class_embeddings_input_dim} (need 6 x addition_time_embed_dim + "
                             f"text_encoder_2 projection_dim = {want})")

    @classmethod
    def from_pretrained(cls, path, controlnet=None, dtype: torch.dtype = torch.float32, device="cpu"):
        """Load a local StableDiffusionXLPipeline directory; `controlnet`: a ControlNet, a directory, or a list."""
        c = load_sdxl_components(path, dtype=dtype, device=device)
        return cls(c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"], c["tokenizer"], c["tokenizer_2"],
                   c["scheduler_config"], load_controlnets(controlnet, dtype, device),
                   c["force_zeros_for_empty_prompt"])

    @torch.no_grad()
    def encode_prompt(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D1 + D2) penultimate hidden states of both CLIP encoders, concatenated, and (B, P) the projected
        pooled output of the second (Podell et al. 2023, Sec. 2.1)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states = []
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = token_ids(tok, prompts)
            out = enc(ids.to(enc.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), out.text_embeds

    def add_time_ids(self, original_size, crops_coords_top_left, target_size, rows: int) -> torch.Tensor:
        """(rows, 6) micro-conditioning: original (h, w), crop (top, left), target (h, w), as numbers."""
        ids = [*_pair(original_size, "original_size"), *_pair(crops_coords_top_left, "crops_coords_top_left"),
               *_pair(target_size, "target_size")]
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(rows, 1)

    def text_conditions(self, prompts, negative_prompts, n, height, width, original_size=None,
                        crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                        negative_crops_coords_top_left=None, negative_target_size=None) -> tuple[dict, dict]:
        """encoder_hidden_states + added_cond_kwargs (text_embeds, time_ids) for both CFG branches. A negative
        prompt None gives zero embeddings when the pipeline's force_zeros_for_empty_prompt is set (SDXL's
        default), else the embeddings of ""; each negative_* size defaults to its positive one."""
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        emb, pooled = self.encode_prompt(prompts)
        neg, neg_pooled = self.encode_prompt([p or "" for p in negative_prompts])
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([p is not None for p in negative_prompts], device=neg.device)
            neg, neg_pooled = neg * keep[:, None, None], neg_pooled * keep[:, None]
        rows = len(prompts) * n
        time_ids = self.add_time_ids(original_size, crops_coords_top_left, target_size, rows)
        neg_time_ids = self.add_time_ids(negative_original_size or original_size,
                                         negative_crops_coords_top_left or crops_coords_top_left,
                                         negative_target_size or target_size, rows)

        def branch(states, pooled_states, ids):
            rep = lambda x: x.repeat_interleave(n, 0).to(self.dtype)  # noqa: E731
            return {"encoder_hidden_states": rep(states),
                    "added_cond_kwargs": {"text_embeds": rep(pooled_states), "time_ids": ids}}

        return branch(emb, pooled, time_ids), branch(neg, neg_pooled, neg_time_ids)

    @torch.no_grad()
    def __call__(self, prompt, image=None, negative_prompt=None, *, original_size: Optional[Sequence] = None,
                 crops_coords_top_left: Sequence = (0, 0), target_size: Optional[Sequence] = None,
                 negative_original_size: Optional[Sequence] = None,
                 negative_crops_coords_top_left: Optional[Sequence] = None,
                 negative_target_size: Optional[Sequence] = None, guidance_scale: float = 5.0, **kwargs):
        """ControlNetPipeline.__call__ (same arguments and outputs) plus SDXL's micro-conditioning:
        original_size / target_size (height, width; default: the output size) and crops_coords_top_left (top,
        left), and negative_* counterparts for the unconditional branch. negative_prompt=None: zero negative
        embeddings (force_zeros_for_empty_prompt), as diffusers."""
        options = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                       target_size=target_size, negative_original_size=negative_original_size,
                       negative_crops_coords_top_left=negative_crops_coords_top_left,
                       negative_target_size=negative_target_size)
        return super().__call__(prompt, image, negative_prompt, guidance_scale=guidance_scale,
                                text_options=options, **kwargs)
