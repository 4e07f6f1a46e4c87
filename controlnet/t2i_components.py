"""Components of the text-to-image task (controlnet.t2i_training): scheduler config, VAE / UNet / CLIP builders,
the image set, the VAE phase (L1 + gradient difference + KL), the denoising loss, pipeline export and the
validation grid. The tokenizer vocabulary is the fill fixture's (scripts/make_fill_dataset.py, make_tiny_sd.py)."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from diffusion.losses import DiffusionLoss
from diffusion.training.checkpoint import step_generator
from diffusion.training.export import atomic_dir
from diffusion.training.guards import NonFiniteGuard

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _fixture_vocabulary():
    """(make_fill_dataset, make_tiny_sd) modules: the fill prompt words and the local CLIP BPE tokenizer writer."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import make_fill_dataset
    import make_tiny_sd

    return make_fill_dataset, make_tiny_sd


def scheduler_config(cfg) -> dict:
    """DDIMScheduler config (diffusers loads it; diffusion.schedule_from_diffusers reads the same table)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
            "prediction_type": cfg.prediction_type, "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing"}


def build_vae(cfg):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_block_out_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         sample_size=cfg.resolution)


def build_unet(cfg, latent_size: int):
    from diffusers import UNet2DConditionModel

    up = tuple(b.replace("Down", "Up") for b in reversed(cfg.down_block_types))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, down_block_types=cfg.down_block_types, up_block_types=up,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_heads, norm_num_groups=cfg.norm_num_groups)


def tokenizer_words() -> list[str]:
    fill, tiny = _fixture_vocabulary()
    return list(fill.PALETTE) + list(fill.PROMPT_WORDS) + list(tiny.EXTRA_WORDS)


def build_text_encoder(cfg, tokenizer_dir: Path):
    """Local CLIP BPE tokenizer over the fill prompt words (scripts/make_tiny_sd.py) + a small CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tiny = _fixture_vocabulary()[1]
    BOS, EOS, write_tokenizer = tiny.BOS, tiny.EOS, tiny.write_tokenizer
    vocab = write_tokenizer(tokenizer_dir, tokenizer_words(), cfg.max_length)
    h = cfg.text_hidden_size
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=h, intermediate_size=2 * h, projection_dim=h,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_length,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    return CLIPTokenizer.from_pretrained(tokenizer_dir), model


def load_images(cfg) -> tuple[torch.Tensor, list[str]]:
    """All training images as a uint8 (N,3,R,R) tensor and their captions (controlnet.data readers)."""
    from controlnet.data import build_rows, load_rgb, resize_center_crop

    rows, root = build_rows(cfg.train_data_dir)
    n = len(rows) if cfg.max_train_samples is None else min(len(rows), cfg.max_train_samples)
    imgs, texts = [], []
    for i in range(n):
        img = np.asarray(resize_center_crop(load_rgb(rows[i]["image"]), cfg.resolution), dtype=np.uint8)
        imgs.append(torch.from_numpy(img.transpose(2, 0, 1).copy()))
        texts.append(rows[i]["text"])
    return torch.stack(imgs), texts


def to_pixels(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------- VAE phase
def random_crops(x: torch.Tensor, size: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image (all of it when size is None or not smaller)."""
    h, w = x.shape[-2:]
    if size is None or size >= min(h, w):
        return x
    ys = torch.randint(0, h - size + 1, (len(x),), generator=generator).tolist()
    xs = torch.randint(0, w - size + 1, (len(x),), generator=generator).tolist()
    return torch.stack([im[:, y:y + size, x0:x0 + size] for im, y, x0 in zip(x, ys, xs)])


def gradient_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gradient difference loss (Mathieu et al. 2016): L1 between horizontal / vertical finite differences."""
    dx = lambda z: z[..., :, 1:] - z[..., :, :-1]  # noqa: E731
    dy = lambda z: z[..., 1:, :] - z[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def train_vae(cfg, images: torch.Tensor, log=print, guard: Optional[NonFiniteGuard] = None):
    """AutoencoderKL on the images: L1 + gradient difference + kl_weight * mean KL, AdamW with cosine decay;
    `guard` (default: cfg.on_nonfinite) stops at, or skips, non-finite steps."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).train()
    with torch.no_grad():  # quant_conv outputs (mean, logvar): start with a small posterior std
        vae.quant_conv.bias[cfg.latent_channels:] = cfg.vae_init_logvar
    guard = guard or NonFiniteGuard(cfg.on_nonfinite, "VAE")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.vae_steps))))
    n = images.shape[0]
    for step in tqdm(range(cfg.vae_steps), desc="vae", disable=not cfg.progress_bar):
        g = step_generator(cfg.seed + 7, step)
        x = to_pixels(random_crops(images[torch.randint(0, n, (cfg.vae_batch_size,), generator=g)], cfg.vae_crop, g))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + cfg.kl_weight * post.kl().mean() / post.mean[0].numel()
        if cfg.vae_gdl_weight:
            loss = loss + cfg.vae_gdl_weight * gradient_difference(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        if guard.check(step + 1, loss.item(), float(norm)):  # NaN/Inf: stop (nothing written yet) or skip
            opt.step()
            guard.check_weights(step + 1, vae.parameters())
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{cfg.vae_steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        x = to_pixels(images[:256])
        z = vae.encode(x).latent_dist.mean
        psnr = -10 * math.log10(((vae.decode(z).sample.clamp(-1, 1) - x) / 2).pow(2).mean().item())
        vae.register_to_config(scaling_factor=round(float(1.0 / z.std()), 5))
    log(f"vae: reconstruction PSNR {psnr:.2f} dB on 256 training images, scaling_factor "
        f"{vae.config.scaling_factor}")
    return vae, psnr


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image, in scaled latent units."""
    means, stds = [], []
    for lo in range(0, images.shape[0], batch):
        post = vae.encode(to_pixels(images[lo:lo + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


# ----------------------------------------------------------------------------------------------- UNet phase
def encode_text(tokenizer, text_encoder, texts) -> torch.Tensor:
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


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
    write_tokenizer = _fixture_vocabulary()[1].write_tokenizer

    with atomic_dir(path) as tmp:  # pipeline/ complete or absent, even on a kill
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # SD1.5's file set: vocab.json + merges.txt
        write_tokenizer(tmp / "tokenizer", tokenizer_words(), cfg.max_length)
    return path


def sample_grid(cfg, unet, vae, text_encoder, tokenizer, n_per_prompt: int = 4) -> np.ndarray:
    """Rows of samples for the validation prompts (controlnet.pipeline without a ControlNet)."""
    from controlnet.pipeline import ControlNetPipeline
    from diffusion.images import image_grid

    pipe = ControlNetPipeline(unet, vae, text_encoder, tokenizer, scheduler_config(cfg))
    rows = []
    for k, prompt in enumerate(cfg.validation_prompt):
        imgs = pipe(prompt, num_images_per_prompt=n_per_prompt, sampler=cfg.sampler,
                    steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                    seed=cfg.seed + 100 * k, output_type="np")
        imgs = getattr(imgs, "images", imgs)  # a pipeline output object, or the array itself
        rows.append([(im * 255).round().astype(np.uint8) for im in imgs])
    return image_grid(rows)
