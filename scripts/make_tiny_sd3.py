#!/usr/bin/env python
"""Write a tiny, randomly initialised Stable Diffusion 3-layout pipeline and SD3 ControlNet (offline test fixture).

    python scripts/make_tiny_sd3.py --out models/tiny-sd3 --resolution 64 --seed 0 [--no_t5]

OUT/ has the exact StableDiffusion3Pipeline layout (model_index.json, transformer/ (SD3Transformer2DModel), vae/
(16 latent channels, no quant convs, shift_factor and scaling_factor measured on fill images), text_encoder/ and
text_encoder_2/ (CLIPTextModelWithProjection: pooled = both projections concatenated), tokenizer/, tokenizer_2/,
text_encoder_3/ + tokenizer_3/ (a T5 encoder with a local Unigram tokenizer; --no_t5 leaves them null, as SD3 allows:
load it with from_pretrained(..., text_encoder_3=None, tokenizer_3=None), and the pipelines use zero T5 embeddings),
scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3)).
OUT-controlnet/ (or --controlnet_out) is SD3ControlNetModel.from_transformer with random, non-zero
zero-initialised layers. Everything loads with diffusers' StableDiffusion3Pipeline / SD3ControlNetModel
.from_pretrained; nothing downloads.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_sdxl import WORDS, clip_encoder, fixture_parser, save_controlnet, write_clip_tokenizers  # noqa: E402
from make_tiny_sd import vae_shift_and_scale  # noqa: E402

from diffusion.models.tokenizer import write_t5_tokenizer  # noqa: E402

T5_DIM = 64  # T5 d_model = the transformer's joint_attention_dim (SD3: 4096)


def make_tiny_sd3(out, resolution: int = 64, seed: int = 0, t5: bool = True, max_length: int = 77,
                  controlnet_out=None, controlnet_layers: int = 1) -> Path:
    """Build and save the tiny SD3 pipeline (OUT) and its ControlNet (controlnet_out, default OUT-controlnet)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    if resolution % 16 or resolution < 32:
        raise ValueError(f"resolution must be a multiple of 16 and >= 32 (VAE factor 8, patch 2), got {resolution}")
    out = Path(out)
    torch.manual_seed(seed)
    vocab = write_clip_tokenizers(out, max_length)
    text_encoder = clip_encoder(CLIPTextModelWithProjection, vocab, hidden=16, projection=16, max_length=max_length)
    text_encoder_2 = clip_encoder(CLIPTextModelWithProjection, vocab, hidden=32, projection=24,
                                  max_length=max_length)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = write_t5_tokenizer(out / "tokenizer_3", WORDS)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0,
            eos_token_id=1)).eval()
    latent = resolution // 8
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=T5_DIM, caption_projection_dim=32, pooled_projection_dim=16 + 24, out_channels=16,
        pos_embed_max_size=latent).eval()  # in patches: latents up to twice the default side
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=resolution, use_quant_conv=False,
        use_post_quant_conv=False).eval()
    shift, scale = vae_shift_and_scale(vae, resolution, seed)
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder_2=text_encoder_2, tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizers(out, max_length)  # CLIP tokenizers as vocab.json + merges.txt, the second padding with "!"

    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=controlnet_layers,
                                                     num_extra_conditioning_channels=0)
    # SD3.5-style: the pooled text reaches the ControlNet and the condition latents are shifted like the image's
    controlnet.register_to_config(force_zeros_for_pooled_projection=False)
    save_controlnet(controlnet, out, controlnet_out, seed + 1)
    return out


def main(argv=None) -> None:
    p = fixture_parser(__doc__, 64, "image side in pixels (multiple of 16, >= 32)")
    p.add_argument("--no_t5", action="store_true", help="no text_encoder_3 / tokenizer_3 (zero T5 embeddings)")
    p.add_argument("--controlnet_layers", type=int, default=1, help="transformer blocks the ControlNet copies")
    a = p.parse_args(argv)
    out = make_tiny_sd3(a.out, a.resolution, a.seed, not a.no_t5, controlnet_out=a.controlnet_out,
                        controlnet_layers=a.controlnet_layers)
    print(f"wrote tiny SD3 pipeline to {out} and its ControlNet to {a.controlnet_out or str(out) + '-controlnet'}")


if __name__ == "__main__":
    main()
