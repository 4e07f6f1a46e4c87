"""ControlNet training on a frozen SDXL base (Podell et al. 2023; Zhang, Rao & Agrawala 2023), on the one loop.

The SD task (controlnet.training.ControlNetTask) with SDXL's inputs, as diffusers' train_controlnet_sdxl.py:
encoder_hidden_states = both CLIP encoders' penultimate hidden states concatenated, added_cond_kwargs = the projected
pooled output of text_encoder_2 ("text_embeds") and the micro-conditioning "time_ids" (original size, crop top-left
(--crops_coords_top_left_h / _w), target size; original = target = --resolution). Captions dropped by
--proportion_empty_prompts are encoded as "" (not zeroed), per micro-batch. The base's own VAE runs in float32
(SDXL's VAE overflows in fp16); a --pretrained_vae_model_name_or_path VAE (e.g. an fp16-safe one) in the
mixed-precision dtype. Outputs are diffusers ControlNetModel directories, as for SD.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion.training.preflight import load_or_explain, require_local_dir

from .pipeline_sdxl import SDXLControlNetPipeline, load_sdxl_components
from .training import ControlNetTask, TrainControlNetConfig, preflight

__all__ = ["SDXLControlNetTask", "SDXL_LAYOUT", "sdxl_preflight", "sdxl_text_inputs"]

SDXL_LAYOUT = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
               "tokenizer", "tokenizer_2", "scheduler/scheduler_config.json")


def sdxl_preflight(cfg: TrainControlNetConfig) -> None:
    """The SD checks on the SDXL layout, then (configs only, no weights): the base's parts fit together as an SDXL
    pipeline (controlnet.families.sdxl_base_mismatches) and a --pretrained_vae_model_name_or_path fits the UNet."""
    from .families import sdxl_base_mismatches

    base = preflight(cfg, SDXL_LAYOUT, family="sdxl")
    read = lambda p: json.loads(Path(p).read_text())  # noqa: E731 (valid JSON: require_local_dir checked it)
    unet, vae = read(base / "unet" / "config.json"), read(base / "vae" / "config.json")
    bad = sdxl_base_mismatches(unet, vae, read(base / "text_encoder" / "config.json"),
                               read(base / "text_encoder_2" / "config.json"))
    if bad:
        raise ValueError(f"--pretrained_model_name_or_path {base}: its parts do not fit together as an SDXL pipeline "
                         f"({'; '.join(bad)}); pass a StableDiffusionXLPipeline directory (scripts/make_tiny_sdxl.py "
                         f"writes a tiny one)")
    if cfg.pretrained_vae_model_name_or_path:
        d = require_local_dir(cfg.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path",
                              ("config.json",))
        own = read(d / "config.json")
        diff = [f"{k}: {own.get(k)} vs the base VAE's {vae.get(k)}" for k in ("latent_channels", "block_out_channels")
                if k == "latent_channels" and own.get(k) != vae.get(k)
                or k == "block_out_channels" and len(own.get(k) or ()) != len(vae.get(k) or ())]
        if diff:
            raise ValueError(f"--pretrained_vae_model_name_or_path {d} does not fit the base ({'; '.join(diff)}): "
                             f"its latents would not be the UNet's; pass an SDXL VAE, or leave the flag unset")


def sdxl_text_inputs(pipe: SDXLControlNetPipeline, texts: list[str], resolution: int, crop=(0, 0)) -> dict:
    """encoder_hidden_states + added_cond_kwargs (text_embeds, time_ids) of captions at a square training size."""
    states, pooled = pipe.encode_prompt(texts)
    size = (resolution, resolution)
    return {"encoder_hidden_states": states.to(pipe.dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(pipe.dtype),
                                  "time_ids": pipe.add_time_ids(size, crop, size, rows=len(texts))}}


class SDXLControlNetTask(ControlNetTask):
    """Only the ControlNet learns; UNet, VAE and both text encoders are frozen."""

    name = "train_controlnet_sdxl"
    frozen = ("unet", "vae", "text_encoder", "text_encoder_2")

    def preflight(self):
        sdxl_preflight(self.cfg)

    def load_frozen(self, weight_dtype):
        cfg, device = self.cfg, self.accelerator.device
        comps = load_or_explain("SDXL components", cfg.pretrained_model_name_or_path,
                                lambda: load_sdxl_components(cfg.pretrained_model_name_or_path, weight_dtype, device))
        # as diffusers: a replacement VAE runs in the weight dtype, SDXL's own (NaN in fp16) in float32
        path, sub, dtype = (cfg.pretrained_vae_model_name_or_path, None, weight_dtype) \
            if cfg.pretrained_vae_model_name_or_path else (cfg.pretrained_model_name_or_path, "vae", torch.float32)
        if sub is None or dtype != weight_dtype:
            from diffusers import AutoencoderKL

            comps["vae"] = load_or_explain("VAE", path, lambda: AutoencoderKL.from_pretrained(
                path, subfolder=sub, torch_dtype=dtype, local_files_only=True).to(device).eval())
        return comps

    def make_pipeline(self, comps, controlnet):
        return SDXLControlNetPipeline(comps["unet"], comps["vae"], comps["text_encoder"], comps["text_encoder_2"],
                                      comps["tokenizer"], comps["tokenizer_2"], comps["scheduler_config"], controlnet,
                                      comps["force_zeros_for_empty_prompt"])

    def encode_text(self, pipe, texts):
        cfg = self.cfg
        return sdxl_text_inputs(pipe, texts, cfg.resolution, (cfg.crops_coords_top_left_h, cfg.crops_coords_top_left_w))
