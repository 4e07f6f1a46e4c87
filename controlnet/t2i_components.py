"""Components of the text-to-image task (controlnet.t2i_training): scheduler config, UNet / CLIP builders, the image
set, the denoising loss, pipeline export and the validation grid (the VAE phase: controlnet.t2i_vae). The tokenizer
is a local CLIP BPE over the fill fixture's words (diffusion.models.tokenizer.FILL_WORDS)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion.losses import DiffusionLoss
from diffusion.models.tokenizer import BOS, EOS, FILL_WORDS, write_clip_tokenizer
from diffusion.training.export import atomic_dir


def scheduler_config(cfg) -> dict:
    """DDIMScheduler config (diffusers loads it; diffusion.schedule_from_diffusers reads the same table)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
            "prediction_type": cfg.prediction_type, "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing"}


def build_unet(cfg, latent_size: int):
    from diffusers import UNet2DConditionModel

    up = tuple(b.replace("Down", "Up") for b in reversed(cfg.down_block_types))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, down_block_types=cfg.down_block_types, up_block_types=up,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_heads, norm_num_groups=cfg.norm_num_groups)


def build_text_encoder(cfg, tokenizer_dir: Path):
    """Local CLIP BPE tokenizer over the fill fixture's words + a small CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_clip_tokenizer(tokenizer_dir, FILL_WORDS, cfg.max_length)
    h = cfg.text_hidden_size
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=h, intermediate_size=2 * h, projection_dim=h,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_length,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    return CLIPTokenizer.from_pretrained(tokenizer_dir), model


def load_images(cfg) -> tuple[torch.Tensor, list[str]]:
    """All training images as a uint8 (N,3,R,R) tensor and their captions (controlnet.data rows, the one reader)."""
    from controlnet.data import build_rows, resize_center_crop
    from diffusion.images import read_image

    rows, root = build_rows(cfg.train_data_dir)
    n = len(rows) if cfg.max_train_samples is None else min(len(rows), cfg.max_train_samples)
    imgs, texts = [], []
    for i in range(n):
        img = np.asarray(resize_center_crop(read_image(rows[i]["image"], root), cfg.resolution), dtype=np.uint8)
        imgs.append(torch.from_numpy(img.transpose(2, 0, 1).copy()))
        texts.append(rows[i]["text"])
    return torch.stack(imgs), texts


# ----------------------------------------------------------------------------------------------- UNet phase
def encode_text(tokenizer, text_encoder, texts) -> torch.Tensor:
    """Last hidden states of the captions (SD1.x conditioning)."""
    from controlnet.pipeline import token_ids

    return text_encoder(token_ids(tokenizer, texts).to(text_encoder.device))[0]


def denoising_loss(loss_fn: DiffusionLoss, unet, text_fn, mean, std, texts, generator, cond_dropout: float = 0.0):
    """Loss of one batch; draws caption dropout, posterior sample, then (inside loss_fn) timesteps and noise."""
    drop = torch.rand(len(texts), generator=generator) < cond_dropout
    texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
    x0 = mean + std * torch.randn(mean.shape, generator=generator)
    return loss_fn(unet, x0, generator=generator, encoder_hidden_states=text_fn(texts))


def save_pipeline(path: Path, cfg, unet, vae, text_encoder, tokenizer) -> Path:
    """diffusers StableDiffusionPipeline layout (safetensors), SD1.5 tokenizer file set."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched_kw = {k: v for k, v in scheduler_config(cfg).items() if not k.startswith("_")}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**sched_kw), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(path) as tmp:  # pipeline/ complete or absent, even on a kill
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer", FILL_WORDS, cfg.max_length)  # SD1.5's file set: vocab.json + merges
    return path


def sample_grid(cfg, unet, vae, text_encoder, tokenizer, n_per_prompt: int = 4) -> np.ndarray:
    """Rows of samples for the validation prompts (controlnet.pipeline without a ControlNet)."""
    from controlnet.pipeline import ControlNetPipeline
    from diffusion.images import image_grid, to_uint8

    pipe = ControlNetPipeline(unet, vae, text_encoder, tokenizer, scheduler_config(cfg))
    rows = []
    for k, prompt in enumerate(cfg.validation_prompt):
        out = pipe(prompt, num_images_per_prompt=n_per_prompt, sampler=cfg.sampler,
                   steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                   seed=cfg.seed + 100 * k, output_type="np")
        rows.append(list(to_uint8(out.images)))
    return image_grid(rows)
