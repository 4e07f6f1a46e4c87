#!/usr/bin/env python
"""SDXL / SD3 ControlNet pipelines vs diffusers' StableDiffusionXLControlNetPipeline /
StableDiffusion3ControlNetPipeline on the tiny fixtures (scripts/make_tiny_sdxl.py, make_tiny_sd3.py): max |ours - diffusers| on the latents and decoded
images, and wall time of both (median of --rounds, interleaved), same weights, latents and steps (SDXL: DDIM
trailing; SD3: FlowMatchEuler on our shifted grid). The SD3 condition's VAE posterior noise is set to the mean on
both sides (diffusers draws it from the global RNG per CFG half).

    .venv/bin/python benchmarks/family_parity.py [--steps 5 --rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_tiny_sd3  # noqa: E402
import make_tiny_sdxl  # noqa: E402

PROMPTS = ["red circle with blue background", "yellow circle"]


def pipelines(root: Path, family: str):
    import diffusers

    if family == "sdxl":
        from controlnet.pipeline_sdxl import SDXLControlNetPipeline as Ours
        d = make_tiny_sdxl.make_tiny_sdxl(root / "sdxl", resolution=32)
        ours = Ours.from_pretrained(d, controlnet=f"{d}-controlnet")
        theirs = diffusers.StableDiffusionXLControlNetPipeline(
            vae=ours.vae, text_encoder=ours.text_encoder, text_encoder_2=ours.text_encoder_2, tokenizer=ours.tokenizer,
            tokenizer_2=ours.tokenizer_2, unet=ours.unet,
            controlnet=diffusers.ControlNetModel.from_pretrained(f"{d}-controlnet"),
            scheduler=diffusers.DDIMScheduler.from_config(ours.scheduler_config, timestep_spacing="trailing",
                                                          set_alpha_to_one=True, clip_sample=False))
        return ours, theirs, 32, dict(sampler="ddim", time_grid="trailing"), {}
    from controlnet.pipeline_sd3 import SD3ControlNetPipeline as Ours
    d = make_tiny_sd3.make_tiny_sd3(root / "sd3", resolution=64)
    ours = Ours.from_pretrained(d, controlnet=f"{d}-controlnet")
    theirs = diffusers.StableDiffusion3ControlNetPipeline(
        transformer=ours.transformer, vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
        text_encoder_2=ours.text_encoder_2, tokenizer_2=ours.tokenizer_2, text_encoder_3=ours.text_encoder_3,
        tokenizer_3=ours.tokenizer_3, controlnet=ours.controlnet,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(ours.scheduler_config))
    return ours, theirs, 64, dict(sampler="flow_euler"), dict(max_sequence_length=12)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sdxl", "sd3"):
            ours, theirs, size, ours_kw, common = pipelines(Path(tmp), family)
            theirs.set_progress_bar_config(disable=True)
            image = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8))
            ch = ours.backbone.config.in_channels
            latents = torch.randn(2, ch, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
            kw = dict(guidance_scale=4.0, latents=latents, height=size, width=size, controlnet_conditioning_scale=0.7,
                      **common)
            extra = {"sigmas": np.linspace(1, 1 / a.steps, a.steps)} if family == "sd3" else {}
            key = "control_image" if family == "sd3" else "image"
            times = {"ours": [], "diffusers": []}
            for r in range(a.rounds):
                for who in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
                    t0 = time.perf_counter()
                    if who == "ours":
                        got = {o: ours(PROMPTS, image, steps=a.steps, output_type=o, **ours_kw, **kw).images
                               for o in ("latent", "pt")}
                    else:
                        ref = {o: theirs(PROMPTS, **{key: image}, num_inference_steps=a.steps, output_type=o,
                                         **extra, **kw).images for o in ("latent", "pt")}
                    times[who].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{family}: max |ours - diffusers| latents {(got['latent'] - ref['latent']).abs().max():.1e} "
                  f"(|z| max {ref['latent'].abs().max():.1f}), images {(got['pt'] - ref['pt']).abs().max():.1e}; "
                  f"wall {med['ours'] * 1e3:.0f} ms vs {med['diffusers'] * 1e3:.0f} ms "
                  f"(ratio {med['ours'] / med['diffusers']:.2f}, {a.steps} steps, CFG, batch 2, latent + decoded)")


if __name__ == "__main__":
    main()
