"""Benchmark: SD3-ControlNet training step, ours (controlnet.training_sd3) vs diffusers' pair as its script runs it.

    python benchmarks/controlnet_step_families.py --family sd3 [--steps 6] [--threads 1] [--latent 8] [--batch 4]

Same run, same weights: the tiny SD3 pipeline (scripts/make_tiny_sd3.py) and fill data at 8 x --latent px. Both steps
do the same work on the same batch: the prompt through CLIP, CLIP and T5 (diffusers: StableDiffusion3Pipeline
.encode_prompt), image and condition through the VAE, logit-normal t, SD3ControlNetModel + frozen
SD3Transformer2DModel, the preconditioned (x0) loss, backward and an AdamW step on the ControlNet. The reference is
the step of diffusers' examples/controlnet/train_controlnet_sd3.py (compute_density_for_timestep_sampling, the
scheduler's sigmas by index, compute_loss_weighting_for_sd3) written out here; that script encodes text once per
dataset instead, a saving open to both. This module is the "sd3" entry of controlnet_step_families.py (which
alternates the timings round by round and prints the paired CPU ratio ours / diffusers, target <= 1.0).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "benchmarks")]


def build(args, tmp: Path):
    """Our task (built as a run builds it), diffusers' pipeline on the same components, a second ControlNet with
    the same weights (zero-initialised layers made non-zero in both: every path does real work), one batch."""
    import make_fill_dataset
    import make_tiny_sd3
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from controlnet.data import collate
    from controlnet.training import TrainControlNetConfig
    from controlnet.training_sd3 import SD3ControlNetTask

    base = make_tiny_sd3.make_tiny_sd3(tmp / "sd3", resolution=args.resolution, seed=0)
    data = make_fill_dataset.write_fill_dataset(tmp / "fill", 4 * args.batch, args.resolution, 0, "both")
    cfg = TrainControlNetConfig(pretrained_model_name_or_path=str(base), train_data_dir=str(data),
                                output_dir=str(tmp / "run"), resolution=args.resolution,
                                train_batch_size=args.batch, report_to="none")
    task = SD3ControlNetTask(cfg)
    task.accelerator = Accelerator(cpu=True)
    dataset, ours = task.build()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in [*ours.controlnet_blocks.parameters(), *ours.pos_embed_input.parameters()]:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    ref = type(ours).from_config(ours.config)
    ref.load_state_dict(ours.state_dict())
    p = task.pipe
    sd3 = StableDiffusion3Pipeline(
        transformer=p.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, text_encoder_2=p.text_encoder_2,
        tokenizer_2=p.tokenizer_2, text_encoder_3=p.text_encoder_3, tokenizer_3=p.tokenizer_3)
    return task, ours, ref.train(), sd3, collate([dataset[i] for i in range(args.batch)])


def our_step(task, net, batch):
    from diffusion.training.checkpoint import step_generator

    opt, k = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-5), [0]

    def step():
        loss = task.loss(net, batch, step_generator(0, k[0]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        k[0] += 1
    return step


def diffusers_step(sd3, net, batch, max_sequence_length: int = 77):
    """One step of train_controlnet_sd3.py (logit_normal, precondition_outputs 1), text encoded per step."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    opt, sched, vae = torch.optim.AdamW(net.parameters(), lr=1e-5), sd3.scheduler, sd3.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    texts = list(batch["text"])

    def step():
        with torch.no_grad():
            states, _, pooled, _ = sd3.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                                     max_sequence_length=max_sequence_length)
            x0 = (vae.encode(batch["pixel_values"]).latent_dist.sample() - shift) * scale
            noise = torch.randn_like(x0)
            u = compute_density_for_timestep_sampling("logit_normal", x0.shape[0], 0.0, 1.0, 1.29)
            index = (u * sched.config.num_train_timesteps).long()
            timesteps, sigmas = sched.timesteps[index], sched.sigmas[index].view(-1, 1, 1, 1)
            x_t = (1.0 - sigmas) * x0 + sigmas * noise
            cond = (vae.encode(batch["conditioning_pixel_values"]).latent_dist.sample() - shift) * scale
        res = net(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=states, pooled_projections=pooled,
                  controlnet_cond=cond, return_dict=False)[0]
        pred = sd3.transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=states,
                               pooled_projections=pooled, block_controlnet_hidden_states=res, return_dict=False)[0]
        pred = pred * (-sigmas) + x_t
        w = compute_loss_weighting_for_sd3("logit_normal", sigmas=sigmas)
        loss = torch.mean((w.float() * (pred.float() - x0.float()) ** 2).reshape(x0.shape[0], -1), 1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sd3_family(args) -> dict:
    """controlnet_step_families.py's entry for SD3: both full steps, and the max |ours - diffusers| velocity of the
    ControlNet + transformer pair on the same inputs (the ControlNet's pooled text zeroed, as
    force_zeros_for_pooled_projection asks)."""
    tmp = tempfile.TemporaryDirectory()
    args.resolution = getattr(args, "resolution", 8 * args.latent)
    task, ours, ref, sd3, batch = build(args, Path(tmp.name))
    g = torch.Generator().manual_seed(2)
    n, side = args.batch, args.resolution // 8
    x, cond = torch.randn(n, 16, side, side, generator=g), torch.randn(n, 16, side, side, generator=g)
    states, pooled = task.pipe.encode_prompt(list(batch["text"]), 77)
    ts = torch.full((n,), 700.0)
    with torch.no_grad():
        mine = task.velocity(ours, x, ts, states, pooled, cond)
        res = ref(hidden_states=x, timestep=ts, encoder_hidden_states=states, pooled_projections=0 * pooled,
                  controlnet_cond=cond, return_dict=False)[0]
        theirs = sd3.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=states, pooled_projections=pooled,
                                 block_controlnet_hidden_states=res, return_dict=False)[0]
    n_cn, n_tr = (sum(q.numel() for q in m.parameters()) / 1e3 for m in (ours, sd3.transformer))
    return {"ours": our_step(task, ours, batch), "diffusers": diffusers_step(sd3, ref, batch), "tmp": tmp,
            "parity": float((mine - theirs).abs().max()),
            "about": f"full step (text, VAE, t, loss) on the tiny SD3 fixture: transformer {n_tr:.0f}k params frozen, "
                     f"ControlNet {n_cn:.0f}k trained ({ours.config.num_layers} block(s)), {args.resolution} px, "
                     f"batch {n}"}


if __name__ == "__main__":
    from controlnet_step_families import main
    main(["--family", "sd3", *sys.argv[1:]])
