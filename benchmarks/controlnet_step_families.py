#!/usr/bin/env python
"""Benchmark: ControlNet training step per model family, ours vs diffusers' model pair, same run, same weights.

    .venv/bin/python benchmarks/controlnet_step_families.py [--steps 6] [--threads 1] [--family sdxl ...]

Each family registers a builder in FAMILIES returning {"ours": step_fn, "diffusers": step_fn, "about": str,
"parity": max |ours - diffusers| of the controlled output}. A training step = ControlNet forward + frozen-backbone
forward with the residuals + MSE backward + AdamW step on the ControlNet only, as in diffusers'
examples/controlnet/train_controlnet_<family>.py. Timings alternate ours / diffusers round by round (the order
flips every round) so that load from other processes hits both alike; reported: median wall and process-CPU ms per
step and the median of the per-round CPU ratios ours / diffusers (target <= 1.0).

Families: sdxl (our ControlNet + ControlledUNet vs diffusers ControlNetModel + UNet2DConditionModel on an SDXL-shaped
UNet: text_time micro-conditioning, pooled text embeds, two transformer layers in the deepest level); sd3 (the whole
step of controlnet.training_sd3 vs diffusers' train_controlnet_sd3.py step on the tiny SD3 fixture,
benchmarks/controlnet_step_sd3.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from controlnet_step import paired_ratio, time_ms  # noqa: E402

# SDXL's shape at small width: DownBlock2D first, cross-attention below it with more transformer layers deeper,
# text_time addition embedding (pooled text of text_encoder_2 + 6 Fourier-embedded add_time_ids).
SDXL_UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=2, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
                 cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=16,
                 projection_class_embeddings_input_dim=6 * 16 + 32, norm_num_groups=16)
FAMILIES = {}


def register(name: str):
    def deco(fn):
        FAMILIES[name] = fn
        return fn
    return deco


def adamw_step(forward, params, target):
    """step(): loss = MSE(forward(), target), backward, AdamW update of `params`."""
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = F.mse_loss(forward().float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


@register("sdxl")
def sdxl(args) -> dict:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlnet import ControlledUNet, ControlNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.latent, **SDXL_UNET)
    ours, ref = ControlNet.from_unet(unet), ControlNetModel.from_unet(unet)
    with torch.no_grad():  # non-zero zero convs, the same in both, so every path does real work
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ref.load_state_dict(ours.state_dict())
    controlled = ControlledUNet(unet, ours)  # freezes the UNet
    b, s = args.batch, args.latent
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(b, 4, s, s, generator=g), torch.randint(0, 1000, (b,), generator=g)
    text, cond = torch.randn(b, 77, 64, generator=g), torch.rand(b, 3, 8 * s, 8 * s, generator=g)
    added = {"text_embeds": torch.randn(b, 32, generator=g),
             "time_ids": torch.tensor([[8.0 * s, 8.0 * s, 0, 0, 8.0 * s, 8.0 * s]]).repeat(b, 1)}
    target = torch.randn(b, 4, s, s, generator=g)

    def theirs():  # as in diffusers' examples/controlnet/train_controlnet_sdxl.py
        down, mid = ref(x, t, encoder_hidden_states=text, added_cond_kwargs=added, controlnet_cond=cond,
                        return_dict=False)
        return unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]

    def mine():
        return controlled(x, t, encoder_hidden_states=text, controlnet_cond=cond, added_cond_kwargs=added)

    ours.train(), ref.train()
    with torch.no_grad():
        parity = float((mine() - theirs()).abs().max())
    n_unet, n_cn = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, ours))
    return {"ours": adamw_step(mine, list(ours.parameters()), target),
            "diffusers": adamw_step(theirs, list(ref.parameters()), target), "parity": parity,
            "about": f"SDXL-shaped UNet {n_unet:.1f}M frozen, ControlNet {n_cn:.1f}M trained, latent {s}x{s}, "
                     f"batch {b}"}


@register("sd3")
def sd3(args) -> dict:
    """The full SD3 step (text, VAE, t, loss) of our task vs diffusers' script: benchmarks/controlnet_step_sd3.py."""
    from controlnet_step_sd3 import sd3_family
    return sd3_family(args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant and family")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)")
    p.add_argument("--latent", type=int, default=16, help="latent side (pixels = 8x)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for name in args.family:
        built = FAMILIES[name](args)
        timing = time_ms({k: built[k] for k in ("ours", "diffusers")}, rounds=args.steps)
        med, lo, hi = paired_ratio(timing, "ours", "diffusers")
        rows.append((name, timing, med, lo, hi))
        print(f"{name}: {built['about']}; max |ours - diffusers| output = {built['parity']:.1e}")
    print(f"\n{'family':<8}{'ours wall':>11}{'diff wall':>11}{'ours CPU':>10}{'diff CPU':>10}{'CPU ratio':>11}"
          f"{'range':>15}   (ms per training step, {args.threads} thread(s), {args.steps} rounds)")
    for name, tm, med, lo, hi in rows:
        print(f"{name:<8}{tm['ours'][0]:>11.1f}{tm['diffusers'][0]:>11.1f}{tm['ours'][1]:>10.1f}"
              f"{tm['diffusers'][1]:>10.1f}{med:>11.3f}{f'{lo:.3f}-{hi:.3f}':>15}")
    print(f"total benchmark time {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
