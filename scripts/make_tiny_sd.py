#!/usr/bin/env python
"""Write a tiny, randomly initialised Stable Diffusion 1.5-layout pipeline directory (offline test fixture).

    python scripts/make_tiny_sd.py --out models/tiny-sd --resolution 32 --seed 0

The directory has the exact StableDiffusionPipeline layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/{vocab.json,merges.txt,...}, scheduler/), safetensors weights, and loads with the real diffusers /
transformers from_pretrained loaders, so code written against it reads a real SD1.5 directory unchanged.
The tokenizer is a small byte-level BPE (CLIP format: byte alphabet + "</w>" word ends + merges for the fill
prompt words and a few common ones), so any text tokenizes; the listed words become few tokens.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: diffusion
from make_fill_dataset import fill_sample  # noqa: E402

from diffusion.models.tokenizer import (BOS, EOS, EXTRA_WORDS, FILL_WORDS, build_bpe,  # noqa: E402,F401
                                        write_clip_tokenizer)  # (EXTRA_WORDS: make_tiny_sdxl; build_bpe: tests)


def vae_shift_and_scale(vae, resolution: int, seed: int, n: int = 16) -> tuple[float, float]:
    """Mean and 1 / std of the VAE's latent means on fill images: the shift_factor / scaling_factor that give
    latents (z - shift) * scale zero mean and unit variance (Rombach et al. 2022, Sec. 4.3.2: the scale; SD3 also
    shifts)."""
    rng = np.random.default_rng(seed)
    imgs = np.stack([fill_sample(rng, resolution)[0] for _ in range(n)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))


def make_tiny_sd(out, resolution: int = 32, seed: int = 0, vae_downsample: int = 8, max_length: int = 77,
                 prediction_type: str = "epsilon", scheduler: str = "pndm", hidden: int = 32) -> Path:
    """Build and save the tiny pipeline; returns the directory."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    levels = int(round(math.log2(vae_downsample)))
    if 2 ** levels != vae_downsample or resolution % vae_downsample or resolution // vae_downsample < 2:
        raise ValueError(f"vae_downsample must be a power of 2 dividing resolution with a latent side >= 2; "
                         f"got vae_downsample={vae_downsample}, resolution={resolution}")
    out = Path(out)
    latent = resolution // vae_downsample
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * (levels + 1),
        up_block_types=("UpDecoderBlock2D",) * (levels + 1), block_out_channels=(8,) * 2 + (16,) * (levels - 1),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=resolution)
    vae.register_to_config(scaling_factor=round(vae_shift_and_scale(vae.eval(), resolution, seed)[1], 5))

    words = list(FILL_WORDS)
    vocab = write_clip_tokenizer(out / "tokenizer", words, max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, set_alpha_to_one=False, steps_offset=1)
    sched = {"pndm": lambda: PNDMScheduler(skip_prk_steps=True, **sched_kw),
             "ddim": lambda: DDIMScheduler(clip_sample=False, **sched_kw),
             "ddpm": lambda: DDPMScheduler(clip_sample=False, **{k: v for k, v in sched_kw.items()
                                                                 if k not in ("set_alpha_to_one",)})}
    if scheduler not in sched:
        raise ValueError(f"scheduler must be one of {sorted(sched)}, got {scheduler!r}")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=sched[scheduler](), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out / "tokenizer", words, max_length)  # SD1.5's file set again (vocab.json + merges.txt)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels (latent side = resolution / 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--vae_downsample", type=int, default=8, help="VAE spatial factor (power of 2; SD uses 8)")
    p.add_argument("--max_length", type=int, default=77, help="tokenizer model_max_length = text positions")
    p.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="scheduler prediction_type (SD1.5: epsilon; SD2-768: v_prediction)")
    p.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim", "ddpm"],
                   help="scheduler class saved in scheduler/ (SD1.5 ships PNDM); all scaled_linear 0.00085..0.012")
    a = p.parse_args(argv)
    out = make_tiny_sd(a.out, a.resolution, a.seed, a.vae_downsample, a.max_length, a.prediction_type, a.scheduler)
    print(f"wrote tiny Stable Diffusion pipeline to {out}")


if __name__ == "__main__":
    main()
