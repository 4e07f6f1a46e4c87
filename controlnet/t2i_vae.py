"""The VAE phase of the text-to-image task (controlnet.t2i_training) as a Task on the shared loop
(diffusion.training.loop): an AutoencoderKL (Kingma & Welling 2014, as in Rombach et al. 2022) trained on the images
with L1 + gradient difference + kl_weight * mean KL.

The phase is a run of its own in output_dir/vae_phase/ (config.yaml, metrics.jsonl, checkpoint-N/, run.lock), so it
has the loop's checkpoints, exact resume (--resume_from_checkpoint latest), non-finite guard, clipping (norm 1), cosine
LR schedule with warm-up and logging. Its export is output_dir/vae (diffusers layout, scaling_factor = 1 / std of the
latent means), which the UNet phase then reads; once vae/ exists the phase is skipped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from diffusion.models.latents import VAEScaling
from diffusion.training.args import TrainingArgs
from diffusion.training.export import recover_export, save_pretrained_atomic
from diffusion.training.guards import refuse_nonfinite
from diffusion.training.loop import Task, train as run_task

PHASE_DIR, EXPORT_DIR = "vae_phase", "vae"  # under the text-to-image run's output_dir


@dataclass
class VAEPhaseArgs(TrainingArgs):
    """The VAE phase's run: the shared flags plus what decides the VAE (its checkpoints record them all)."""

    train_data_dir: str = "data/fill64"
    max_train_samples: Optional[int] = None
    resolution: int = 64
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    norm_num_groups: int = 8
    crop: Optional[int] = 32  # random crops of this side (None: whole images)
    kl_weight: float = 1e-6
    gdl_weight: float = 0.0
    init_logvar: float = -8.0


def vae_phase_args(cfg) -> VAEPhaseArgs:
    """The VAE phase's args from a TrainT2IConfig: its vae_* keys, the shared run keys (seed, precision, checkpoints,
    resume, logging, guard) as given, AdamW (0.9, 0.999) without weight decay, cosine decay after min(50, vae_steps)
    warm-up steps, clipping at norm 1, no EMA. A --resume_from_checkpoint of any kind resumes the phase's latest."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainingArgs)}
    shared.update(
        output_dir=str(Path(cfg.output_dir) / PHASE_DIR), train_batch_size=cfg.vae_batch_size,
        gradient_accumulation_steps=1, max_train_steps=cfg.vae_steps, learning_rate=cfg.vae_learning_rate,
        scale_lr=False, lr_scheduler="cosine", lr_warmup_steps=min(50, cfg.vae_steps), adam_beta1=0.9,
        adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0, use_ema=False,
        validation_steps=0, tracker_project_name="train_t2i_vae",
        resume_from_checkpoint="latest" if cfg.resume_from_checkpoint else None)
    return VAEPhaseArgs(**shared, train_data_dir=cfg.train_data_dir, max_train_samples=cfg.max_train_samples,
                        resolution=cfg.resolution, block_out_channels=tuple(cfg.vae_block_out_channels),
                        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, crop=cfg.vae_crop,
                        kl_weight=cfg.kl_weight, gdl_weight=cfg.vae_gdl_weight, init_logvar=cfg.vae_init_logvar)


def build_vae(cfg):
    """AutoencoderKL of cfg.vae_block_out_channels (TrainT2IConfig) or cfg.block_out_channels (VAEPhaseArgs)."""
    from diffusers import AutoencoderKL

    widths = tuple(getattr(cfg, "vae_block_out_channels", None) or cfg.block_out_channels)
    n = len(widths)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths, layers_per_block=1,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         sample_size=cfg.resolution)


def to_pixels(u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float pixels in [-1, 1]."""
    return u8.float() / 127.5 - 1


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


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image, in the network's latent units (VAEScaling)."""
    means, stds = [], []
    for lo in range(0, images.shape[0], batch):
        post = vae.encode(to_pixels(images[lo:lo + batch]).to(vae.device)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    scaling = VAEScaling.of(vae)
    return scaling.normalize(torch.cat(means)), torch.cat(stds) * scaling.scale


class VAETask(Task):
    """AutoencoderKL on uint8 images (N, 3, R, R); export: scaling_factor set, written to `export_dir`."""

    name = "train_t2i_vae"
    phase = "VAE"  # guard messages say "VAE step N"
    single_process = True

    def __init__(self, cfg: VAEPhaseArgs, images: torch.Tensor, export_dir):
        super().__init__(cfg)
        self.images, self.export_dir = images, Path(export_dir)

    def build(self):
        vae = build_vae(self.cfg).train()
        with torch.no_grad():  # quant_conv outputs (mean, logvar): start with a small posterior std
            vae.quant_conv.bias[self.cfg.latent_channels:] = self.cfg.init_logvar
        return self.images, vae.to(self.accelerator.device)

    def loss(self, model, batch, generator):
        cfg, vae = self.cfg, self.accelerator.unwrap_model(model)
        x = to_pixels(random_crops(batch, cfg.crop, generator)).to(vae.device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(vae.device)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + cfg.kl_weight * post.kl().mean() / post.mean[0].numel()
        if cfg.gdl_weight:
            loss = loss + cfg.gdl_weight * gradient_difference(rec, x)
        return loss

    @torch.no_grad()
    def export(self, model, ema_model):
        vae = model.eval()
        x = to_pixels(self.images[:256]).to(vae.device)
        z = vae.encode(x).latent_dist.mean
        psnr = -10 * math.log10(((vae.decode(z).sample.clamp(-1, 1) - x) / 2).pow(2).mean().item())
        scale = round(float(1.0 / z.std()), 5)  # unit-variance latents (Rombach et al. 2022, Sec. 4.3.2)
        vae.register_to_config(scaling_factor=scale)
        self.accelerator.print(f"vae: reconstruction PSNR {psnr:.2f} dB on {len(x)} training images, "
                               f"scaling_factor {scale}")
        refuse_nonfinite(vae.parameters(), self.export_dir)
        save_pretrained_atomic(vae, self.export_dir, safe_serialization=True)  # vae/ complete or absent, even on a kill
        return {"vae_psnr": psnr}


def obtain_vae(cfg, images: torch.Tensor, log=print) -> tuple[torch.nn.Module, Optional[float]]:
    """(frozen VAE, PSNR or None): --pretrained_vae, else output_dir/vae of an earlier run, else the VAE phase run
    on the loop (resuming output_dir/vae_phase with --resume_from_checkpoint); its summary (PSNR, seconds, skipped
    steps) is appended to output_dir/metrics.jsonl."""
    from diffusers import AutoencoderKL

    from diffusion.training.preflight import load_or_explain

    out = Path(cfg.output_dir)
    vae_dir = Path(cfg.pretrained_vae) if cfg.pretrained_vae else recover_export(out / EXPORT_DIR)
    psnr = None
    if not (vae_dir / "config.json").is_file():
        t0 = time.time()
        res = run_task(VAETask(vae_phase_args(cfg), images, vae_dir))
        psnr = res["vae_psnr"]
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": "vae", "psnr": psnr, "seconds": time.time() - t0, "steps": res["step"],
                                "skipped_steps": res["skipped"]}) + "\n")
    else:
        log(f"using the VAE in {vae_dir}")
    vae = load_or_explain("VAE", vae_dir, lambda: AutoencoderKL.from_pretrained(vae_dir))
    return vae.requires_grad_(False).eval(), psnr
