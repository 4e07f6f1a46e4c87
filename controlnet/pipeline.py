"""Text + condition image sampling for Stable-Diffusion-layout UNets with ControlNet(s) (Zhang et al. 2023).

    pipe = ControlNetPipeline.from_pretrained("models/tiny-sd", controlnet="out/controlnet")
    images = pipe("red circle with blue background", edge_image, sampler="dpmpp_2m", steps=20, seed=0).images

Loads a local diffusers-format pipeline directory (StableDiffusionPipeline layout: unet/, vae/, text_encoder/,
tokenizer/, scheduler/) with the real diffusers / transformers loaders, encodes prompts with the CLIP text
encoder, applies classifier-free guidance (Ho & Salimans 2022), runs the ControlledUNet through
diffusion.sample with any registered sampler on the noise schedule read from scheduler/, and decodes with the VAE.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from diffusion import (classifier_free_guidance, prediction_from_diffusers, prior_sample, sample,
                       schedule_from_diffusers, time_input_from_diffusers, wrap_model)
from diffusion.images import image_grid, read_image, to_pil  # noqa: F401  (image_grid: re-exported)
from diffusion.models.latents import VAEScaling
from diffusion.samplers import as_generators

from diffusers.utils import BaseOutput

from .controlled import ControlledUNet, MultiControlNet
from .model import GUESS_MODE_SCALES, ControlNet

__all__ = ["ControlNetPipeline", "ControlNetPipelineOutput", "OUTPUT_TYPES", "check_pipeline_dir", "read_model_index",
           "load_components", "read_scheduler_config", "controlled_unet", "CastResiduals",
           "image_grid", "to_pil"]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ControlNetPipelineOutput(BaseOutput):
    """What a pipeline call returns, as diffusers' pipeline outputs: `images` is a list of PIL RGB images
    (output_type "pil"), a (B, H, W, 3) float32 array in [0, 1] ("np"), a (B, 3, H, W) float32 tensor in [0, 1]
    ("pt"), or the final (B, C, h, w) latents ("latent")."""

    images: Union[list, np.ndarray, torch.Tensor]


def check_pipeline_dir(path, components: Sequence[str] = COMPONENTS, family: str = "Stable Diffusion",
                       writer: str = "StableDiffusionPipeline", script: str = "make_tiny_sd.py",
                       note: str = "") -> Path:
    """The local diffusers pipeline directory `path`, or a ValueError naming the missing component folders."""
    path = Path(path)
    missing = [c for c in components if not (path / c).is_dir()]
    if not path.is_dir() or missing:
        raise ValueError(f"{path} is not a local diffusers-format {family} directory (missing "
                         f"{missing or 'the directory'}); expected {', '.join(c + '/' for c in components)}{note} "
                         f"as written by {writer}.save_pretrained or scripts/{script} (hub ids are not downloaded)")
    return path


def read_model_index(path) -> dict:
    """model_index.json of a pipeline directory ({} without one)."""
    f = Path(path) / "model_index.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def read_scheduler_config(path) -> dict:
    """scheduler/scheduler_config.json of a pipeline directory (its _class_name included)."""
    f = check_pipeline_dir(path) / "scheduler" / "scheduler_config.json"
    return json.loads(f.read_text())


def load_components(path, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """unet, vae, text_encoder, tokenizer and scheduler_config of a local pipeline directory (offline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_pipeline_dir(path)
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    return dict(unet=unet.to(device).eval(), vae=vae.to(device).eval(), text_encoder=text_encoder.to(device).eval(),
                tokenizer=tokenizer, scheduler_config=read_scheduler_config(path))


def load_controlnets(controlnet, dtype, device):
    """None, one ControlNet (object or directory) or a list of them -> None, one ControlNet or a list, in eval
    mode with the pipeline's dtype and device."""
    if controlnet is None:
        return None
    nets = [(ControlNet.from_pretrained(c) if isinstance(c, (str, os.PathLike)) else c).to(device=device, dtype=dtype)
            .eval() for c in (controlnet if isinstance(controlnet, (list, tuple)) else [controlnet])]
    return nets[0] if len(nets) == 1 else nets


def token_ids(tokenizer, prompts: Sequence[str], max_length: Optional[int] = None) -> torch.Tensor:
    """Token ids padded / truncated to max_length (default: the tokenizer's model_max_length), as SD does."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class CastResiduals(torch.nn.Module):
    """Runs a ControlNet in its own dtype and returns its residuals in the UNet's (e.g. fp32 ControlNet on a
    bf16 / fp16 frozen UNet, as in mixed-precision training)."""

    def __init__(self, controlnet: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.controlnet, self.out_dtype = controlnet, dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, **kwargs):
        dt = next(self.controlnet.parameters()).dtype
        cond = [c.to(dt) for c in controlnet_cond] if isinstance(controlnet_cond, (list, tuple)) \
            else controlnet_cond.to(dt)
        down, mid = self.controlnet(sample.to(dt), timestep, encoder_hidden_states.to(dt), cond, **kwargs)
        return type(down)(d.to(self.out_dtype) for d in down), mid.to(self.out_dtype)


def controlled_unet(unet, controlnet) -> ControlledUNet:
    """ControlledUNet(unet, controlnet), casting the residuals when the ControlNet's dtype differs from the UNet's."""
    if isinstance(controlnet, (list, tuple)):
        controlnet = controlnet[0] if len(controlnet) == 1 else MultiControlNet(controlnet)
    u_dt, c_dt = next(unet.parameters()).dtype, next(controlnet.parameters()).dtype
    return ControlledUNet(unet, controlnet if u_dt == c_dt else CastResiduals(controlnet, u_dt))


class ControlNetPipeline:
    """Frozen SD-layout UNet + VAE + CLIP text encoder, optional ControlNet(s), any sampler of diffusion.sample."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict,
                 controlnet: Union[None, ControlNet, Sequence[ControlNet]] = None):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self._init_common(vae, scheduler_config, controlnet)

    def _init_common(self, vae, scheduler_config: dict, controlnet) -> None:
        """VAE, schedule / prediction / time signal from the scheduler config (diffusion.interop), ControlNet(s)."""
        self.vae, self.controlnet = vae, controlnet
        self.scheduler_config = dict(scheduler_config)
        self.schedule = schedule_from_diffusers(self.scheduler_config)
        self.prediction = prediction_from_diffusers(self.scheduler_config)
        self.time_input = time_input_from_diffusers(self.scheduler_config)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.pixel_multiple = self.vae_scale  # height / width must be multiples of it (SD3: VAE factor x patch size)

    @classmethod
    def from_pretrained(cls, path, controlnet=None, dtype: torch.dtype = torch.float32, device="cpu"):
        """Load a local pipeline directory; `controlnet` is a ControlNet, a directory, or a list of them."""
        comps = load_components(path, dtype=dtype, device=device)
        return cls(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler_config"],
                   load_controlnets(controlnet, dtype, device))

    @property
    def backbone(self) -> torch.nn.Module:
        """The denoising network (UNet; SD3: transformer)."""
        return self.unet

    @property
    def device(self) -> torch.device:
        """Where the networks run: the offload device with model CPU offload, else the backbone's."""
        dev = getattr(self, "_execution_device", None)
        return dev if dev is not None else next(self.backbone.parameters()).device

    def enable_model_cpu_offload(self, device="cuda") -> None:
        """Networks on the CPU, each group moved to `device` only while used (controlnet.runtime)."""
        from .runtime import enable_model_cpu_offload
        enable_model_cpu_offload(self, device)

    def free_model_hooks(self) -> None:
        """With model CPU offload: every network back on the CPU (done at the end of each call)."""
        for hook in getattr(self, "_offload_hooks", ()):
            hook.offload()

    def compile(self, **options) -> None:
        """torch.compile the UNet / transformer and ControlNet(s) in place (controlnet.runtime.compile_networks)."""
        from .runtime import compile_networks
        compile_networks(self, **options)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    # ---- encoders ------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP token ids padded / truncated to the tokenizer's model_max_length, as SD does."""
        return token_ids(self.tokenizer, prompts)

    @torch.no_grad()
    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Last hidden states of the text encoder, (B, L, D): the UNet's encoder_hidden_states."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """VAE latents of images in [-1, 1], sampled from the posterior and scaled as the UNet expects."""
        z = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return VAEScaling.of(self.vae).normalize(z)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B,3,H,W) float32, from scaled latents."""
        z = VAEScaling.of(self.vae).denormalize(latents)
        x = self.vae.decode(z.to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def prepare_condition(self, image, batch: int, height: int, width: int) -> torch.Tensor:
        """Condition image(s) -> (batch,3,H,W) in [0,1]. Accepts a path, PIL image, HxWx3 uint8 array, (3,H,W) /
        (B,3,H,W) tensor in [0,1], or a list of these (one per prompt, or one for all)."""
        from PIL import Image

        items = list(image) if isinstance(image, (list, tuple)) else [image]
        out = []
        for it in items:
            if torch.is_tensor(it):
                t = it[None] if it.ndim == 3 else it
                if t.numel() and (t.min() < 0 or t.max() > 1):
                    raise ValueError(f"condition tensors must lie in [0, 1], got values in [{t.min().item():.4g}, "
                                     f"{t.max().item():.4g}]; divide 0-255 images by 255 (or pass a PIL image / "
                                     f"uint8 array)")
            else:
                pil = read_image(it).resize((width, height), Image.BILINEAR)
                t = torch.from_numpy(np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0)[None]
            if t.shape[-2:] != (height, width):
                t = torch.nn.functional.interpolate(t.float(), size=(height, width), mode="bilinear",
                                                    align_corners=False)
            out.append(t.float())
        cond = torch.cat(out)
        if cond.shape[0] != batch:
            if batch % cond.shape[0]:
                raise ValueError(f"{cond.shape[0]} condition images for a batch of {batch}: give 1, one per "
                                 f"prompt, or one per sample")
            cond = cond.repeat_interleave(batch // cond.shape[0], dim=0)
        return cond.to(self.device, self.dtype)

    # ---- family hooks (the SDXL / SD3 pipelines override these) ---------------------------------------------
    def text_conditions(self, prompts: Sequence[str], negative_prompts: Sequence[Optional[str]], n: int, height: int,
                        width: int) -> tuple[dict, dict]:
        """Network inputs of the prompts and of the negative prompts (None: ""), n rows per prompt."""
        emb = self.encode_prompt(prompts).repeat_interleave(n, 0).to(self.dtype)
        neg = self.encode_prompt([p or "" for p in negative_prompts]).repeat_interleave(n, 0).to(self.dtype)
        return {"encoder_hidden_states": emb}, {"encoder_hidden_states": neg}

    def control_conditions(self, image, batch: int, height: int, width: int, generator=None):
        """controlnet_cond: condition images in [0, 1], one tensor per ControlNet (a list for several)."""
        if isinstance(self.controlnet, (list, tuple)):
            if not isinstance(image, (list, tuple)) or len(image) != len(self.controlnet):
                raise ValueError(f"{len(self.controlnet)} ControlNets need a list of as many condition images")
            return [self.prepare_condition(im, batch, height, width) for im in image]
        return self.prepare_condition(image, batch, height, width)

    def network(self, conditioning_scale=1.0, guess_mode: bool = False, guess_mode_scales: str = "diffusers",
                only_mid_control: bool = False) -> tuple:
        """(net, fixed keyword inputs): the UNet, or the UNet steered by the ControlNet(s)."""
        if guess_mode_scales not in GUESS_MODE_SCALES:
            raise ValueError(f"unknown guess_mode_scales {guess_mode_scales!r}; valid: {', '.join(GUESS_MODE_SCALES)}")
        if self.controlnet is None:
            return self.unet, {}
        return controlled_unet(self.unet, self.controlnet), dict(
            conditioning_scale=conditioning_scale, guess_mode=guess_mode, guess_mode_scales=guess_mode_scales,
            only_mid_control=only_mid_control)

    # ---- sampling ------------------------------------------------------------------------------------------
    def denoiser(self, guidance_scale: float = 7.5, uncond_embeddings: Union[None, torch.Tensor, dict] = None,
                 conditioning_scale=1.0, guess_mode: bool = False, guidance_rescale: float = 0.0,
                 guess_mode_scales: str = "diffusers", only_mid_control: bool = False):
        """model_fn(x_t, t, encoder_hidden_states=..., controlnet_cond=...) -> (x0, eps), CFG-guided unless scale 1.

        `uncond_embeddings`: the negative text states, or a dict of all unconditional inputs (text_conditions).
        Guess mode under CFG runs the ControlNet on the conditional half only (as diffusers does): the caller puts
        control_mask=ones(B) in the conditional inputs; the unconditional half gets zeros here."""
        net, extra = self.network(conditioning_scale, guess_mode, guess_mode_scales, only_mid_control)
        if self.dtype != torch.float32:  # half-precision networks, float32 sampler state (as diffusers' schedulers)
            half, dt = net, self.dtype
            net = lambda x, t, **kw: half(x.to(dt), t, **kw)  # noqa: E731
        fn = wrap_model(net, self.schedule, self.prediction, time_input=self.time_input, **extra)
        if guidance_scale == 1.0:
            return fn
        if uncond_embeddings is None:
            raise ValueError("classifier-free guidance needs uncond_embeddings (e.g. encode_prompt(''))")
        uncond = dict(uncond_embeddings) if isinstance(uncond_embeddings, dict) else \
            {"encoder_hidden_states": uncond_embeddings}
        if guess_mode and self.controlnet is not None:
            rows = uncond["encoder_hidden_states"]
            uncond["control_mask"] = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        return classifier_free_guidance(fn, guidance_scale, uncond, rescale=guidance_rescale)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str]], image=None,
                 negative_prompt: Union[None, str, Sequence[Optional[str]]] = "",
                 height: Optional[int] = None, width: Optional[int] = None, num_images_per_prompt: int = 1,
                 sampler: str = "dpmpp_2m", steps: Optional[int] = None, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, controlnet_conditioning_scale=1.0, guess_mode: bool = False,
                 guess_mode_scales: str = "diffusers", only_mid_control: bool = False,
                 seed: Union[None, int, Sequence[int]] = None, generator=None, time_grid: Optional[str] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil", callback=None,
                 progress: bool = False, text_options: Optional[dict] = None, return_dict: bool = True,
                 **sampler_options):
        """Generate images: a ControlNetPipelineOutput whose `images` are PIL images (output_type="pil"), a
        (B,H,W,3) float array ("np"), a (B,3,H,W) tensor in [0,1] ("pt") or the latents ("latent"); with
        return_dict=False the tuple (images,), as diffusers. Sample i uses seed + i (or generator).
        `text_options` go to text_conditions (SDXL micro-conditioning, SD3 max_sequence_length)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        if self.controlnet is not None and image is None:
            raise ValueError("this pipeline has a ControlNet: pass image= (the condition, e.g. an edge map)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = [negative_prompt] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
            else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
        b = len(prompts) * num_images_per_prompt
        size = self.backbone.config.sample_size * self.vae_scale
        height, width = height or size, width or size
        if height % self.pixel_multiple or width % self.pixel_multiple:
            raise ValueError(f"height and width must be multiples of {self.pixel_multiple}, got {height}x{width}")

        shape = (b, self.backbone.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        gens = generator  # None (and no seed): the global RNG
        if gens is None and seed is not None:  # created once: prior, condition (SD3) and sampler noise, one stream
            gens = as_generators(seed if isinstance(seed, int) else list(seed), b)
        x = latents.to(self.device, torch.float32) if latents is not None else \
            prior_sample(shape, self.schedule, gens, dtype=torch.float32, device=self.device)
        cond, uncond = self.text_conditions(prompts, negs, num_images_per_prompt, height, width, **(text_options or {}))
        if self.controlnet is not None:
            cond["controlnet_cond"] = self.control_conditions(image, b, height, width, gens)
        model_fn = self.denoiser(guidance_scale, uncond, controlnet_conditioning_scale, guess_mode, guidance_rescale,
                                 guess_mode_scales, only_mid_control)
        if guess_mode and self.controlnet is not None and guidance_scale != 1.0:
            cond["control_mask"] = torch.ones(b, dtype=torch.bool, device=self.device)
        z = sample(model_fn, x, self.schedule, sampler=sampler, steps=steps, time_grid=time_grid, cond=cond,
                   generator=gens, callback=callback, progress=progress, **sampler_options)
        images = z if output_type == "latent" else self.postprocess(self.decode_latents(z), output_type)
        self.free_model_hooks()
        return ControlNetPipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def postprocess(images: torch.Tensor, output_type: str = "pil"):
        """Decoded (B,3,H,W) images in [0, 1] as output_type "pt" (unchanged), "np" ((B,H,W,3) array) or "pil"."""
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            return to_pil(images)
        raise ValueError(f"output_type must be one of pt, np, pil for decoded images; got {output_type!r}")
