#!/usr/bin/env python
"""Write a tiny, randomly initialised SDXL-layout pipeline and ControlNet (offline test fixture).

    python scripts/make_tiny_sdxl.py --out models/tiny-sdxl --resolution 32 --seed 0

OUT/ has the exact StableDiffusionXLPipeline layout (model_index.json, unet/, vae/, text_encoder/ (CLIPTextModel),
text_encoder_2/ (CLIPTextModelWithProjection: its projected pooled output feeds the UNet), tokenizer/,
tokenizer_2/ (pad token "!" as SDXL's), scheduler/ (SDXL's EulerDiscreteScheduler config)); the UNet has SDXL's
micro-conditioning (addition_embed_type "text_time": pooled text + 6 Fourier-embedded add_time_ids) and a cross-
attention width equal to the two encoders' hidden sizes concatenated. OUT-controlnet/ (or --controlnet_out) is
ControlNetModel.from_unet of that UNet with random, non-zero zero convolutions, so it changes the output.
Everything loads with diffusers' StableDiffusionXLPipeline / ControlNetModel.from_pretrained; nothing downloads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fill_dataset import PALETTE, PROMPT_WORDS  # noqa: E402
from make_tiny_sd import EXTRA_WORDS, vae_shift_and_scale  # noqa: E402

from diffusion.models.tokenizer import BOS, EOS, write_clip_tokenizer  # noqa: E402

WORDS = list(PALETTE) + list(PROMPT_WORDS) + list(EXTRA_WORDS)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)


def write_clip_tokenizers(out: Path, max_length: int) -> dict:
    """tokenizer/ and tokenizer_2/ over WORDS; SDXL's / SD3's second CLIP tokenizer pads with "!"."""
    vocab = write_clip_tokenizer(out / "tokenizer", WORDS, max_length)
    write_clip_tokenizer(out / "tokenizer_2", WORDS, max_length, pad_token="!")
    return vocab


def clip_encoder(cls, vocab: dict, hidden: int, projection: int, max_length: int):
    """A 2-layer CLIP text encoder of the given widths (the SD family's token ids and position count)."""
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length, hidden_act="gelu",
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])).eval()


def randomize_zero_layers(controlnet, seed: int, std: float = 0.05):
    """Random values in the zero-initialised output layers (zero convs, hint encoder conv_out): parity can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
                                "controlnet_blocks", "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return controlnet


def save_controlnet(controlnet, out: Path, controlnet_out, seed: int) -> Path:
    """Randomised zero layers (seed), saved to controlnet_out or OUT-controlnet beside the pipeline."""
    cn_out = Path(controlnet_out) if controlnet_out else out.with_name(out.name + "-controlnet")
    randomize_zero_layers(controlnet.eval(), seed).save_pretrained(cn_out, safe_serialization=True)
    return cn_out


def fixture_parser(doc: str, resolution: int, resolution_help: str) -> argparse.ArgumentParser:
    """The tiny-fixture scripts' shared flags: --out, --controlnet_out, --resolution, --seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument("--controlnet_out", default=None, help="ControlNet directory (default: OUT-controlnet)")
    p.add_argument("--resolution", type=int, default=resolution, help=resolution_help)
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    return p


def make_tiny_sdxl(out, resolution: int = 32, seed: int = 0, max_length: int = 77, controlnet_out=None) -> Path:
    """Build and save the tiny SDXL pipeline (OUT) and its ControlNet (controlnet_out, default OUT-controlnet)."""
    from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if resolution % 16 or resolution < 16:
        raise ValueError(f"resolution must be a positive multiple of 16 (VAE factor 8, two UNet levels), "
                         f"got {resolution}")
    out = Path(out)
    torch.manual_seed(seed)
    vocab = write_clip_tokenizers(out, max_length)
    text_encoder = clip_encoder(CLIPTextModel, vocab, hidden=16, projection=16, max_length=max_length)
    text_encoder_2 = clip_encoder(CLIPTextModelWithProjection, vocab, hidden=32, projection=24, max_length=max_length)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=16 + 32, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + 24, norm_num_groups=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=resolution, force_upcast=True).eval()
    vae.register_to_config(scaling_factor=round(vae_shift_and_scale(vae, resolution, seed)[1], 5))  # SDXL: no shift
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler config
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
        use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizers(out, max_length)  # SD's tokenizer file set again (vocab.json + merges.txt), pad tokens

    save_controlnet(ControlNetModel.from_unet(unet), out, controlnet_out, seed + 1)
    return out


def main(argv=None) -> None:
    p = fixture_parser(__doc__, 32, "image side in pixels (multiple of 16)")
    p.add_argument("--max_length", type=int, default=77, help="tokenizers' model_max_length = text positions")
    a = p.parse_args(argv)
    out = make_tiny_sdxl(a.out, a.resolution, a.seed, a.max_length, a.controlnet_out)
    print(f"wrote tiny SDXL pipeline to {out} and its ControlNet to {a.controlnet_out or str(out) + '-controlnet'}")


if __name__ == "__main__":
    main()
