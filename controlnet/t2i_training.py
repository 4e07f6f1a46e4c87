"""Text-to-image task: a small latent diffusion model (Rombach et al. 2022) trained from scratch into a diffusers
Stable Diffusion pipeline directory, on fill50k-style data (scripts/make_fill_dataset.py), on the shared loop.

Both phases run on the shared loop (diffusion.training.loop). Phase 1 (skipped with --pretrained_vae or when
output_dir/vae exists): an AutoencoderKL trained on the images (controlnet.t2i_vae.VAETask; its run, checkpoints
included, in output_dir/vae_phase), exported to output_dir/vae. Phase 2: a UNet2DConditionModel on the VAE
posteriors of the images, conditioned on a frozen (or trained) small CLIPTextModel; schedule and prediction kind
from the scheduler config (diffusion.schedule_from_diffusers), loss diffusion.losses.DiffusionLoss (optional
min-SNR weighting), caption dropout for classifier-free guidance. The final EMA UNet is exported as
output_dir/pipeline (StableDiffusionPipeline layout).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from diffusion import prediction_from_diffusers, schedule_from_diffusers
from diffusion.losses import DiffusionLoss
from diffusion.training.args import TrainingArgs
from diffusion.training.config import option as _h
from diffusion.training.guards import check_optimizer_args, refuse_nonfinite
from diffusion.training.loop import Task, train as run_task
from diffusion.training.preflight import check_memory, require_local_dir

from .t2i_components import (build_text_encoder, build_unet, denoising_loss, encode_text, load_images,  # noqa: F401
                             sample_grid, save_pipeline, scheduler_config)
from .t2i_vae import build_vae, encode_all, gradient_difference, obtain_vae, random_crops  # noqa: F401


@dataclass
class TrainT2IConfig(TrainingArgs):
    """Train a tiny latent text-to-image model (VAE + UNet + CLIP text encoder) into a diffusers pipeline dir."""

    num_threads: Optional[int] = _h("torch.set_num_threads (1 is fastest on shared CPUs; None: torch's default)",
                                    default=1)
    # data
    train_data_dir: str = _h("local fill50k (prompt.json) or imagefolder (metadata.jsonl) folder",
                             default="data/fill64")
    resolution: int = _h("image side in pixels (resize short side + center crop)", default=64)
    max_train_samples: Optional[int] = _h("use only the first N samples", default=None)
    # UNet and text encoder
    block_out_channels: tuple[int, ...] = _h("UNet widths per level", default=(32, 64, 64))
    down_block_types: tuple[str, ...] = _h("UNet down blocks (DownBlock2D | CrossAttnDownBlock2D); up blocks mirror",
                                           default=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
    layers_per_block: int = _h("resnet layers per UNet level", default=1)
    attention_heads: int = _h("attention heads (diffusers' attention_head_dim)", default=4)
    norm_num_groups: int = _h("GroupNorm groups in UNet and VAE", default=8)
    text_hidden_size: int = _h("CLIP text encoder width = UNet cross_attention_dim", default=32)
    text_layers: int = _h("CLIP text encoder layers", default=2)
    max_length: int = _h("tokenizer model_max_length (text positions)", default=16)
    train_text_encoder: bool = _h("train the text encoder jointly (else frozen at its random init)", default=False)
    # VAE
    pretrained_vae: Optional[str] = _h("AutoencoderKL dir to use instead of training one (phase 1 skipped)",
                                       default=None)
    vae_block_out_channels: tuple[int, ...] = _h("VAE widths; downsampling factor 2^(levels-1)", default=(16, 32, 32))
    latent_channels: int = _h("VAE latent channels", default=4)
    vae_steps: int = _h("VAE optimizer steps", default=800)
    vae_batch_size: int = _h("VAE batch size", default=16)
    vae_crop: Optional[int] = _h("train the (convolutional) VAE on random crops of this side: cheaper steps, as SD's "
                                 "VAE trains on 256-px crops (None: whole images)", default=32)
    vae_learning_rate: float = _h("VAE AdamW learning rate (cosine decay after min(50, vae_steps) warm-up steps)",
                                  default=2e-3)
    kl_weight: float = _h("weight of the mean KL term in the VAE loss", default=1e-6)
    vae_gdl_weight: float = _h("weight of the gradient difference loss (Mathieu et al. 2016): sharp edges",
                               default=0.0)
    vae_init_logvar: float = _h("initial posterior log-variance (quant_conv bias): nearly deterministic latents "
                                "from the first step", default=-8.0)
    # noise schedule, written to scheduler/scheduler_config.json
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = _h("DDPM beta table", default="linear")
    beta_start: float = _h("first beta", default=1e-4)
    beta_end: float = _h("last beta", default=0.02)
    num_train_timesteps: int = _h("DDPM timesteps", default=1000)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = _h("UNet output kind", default="v_prediction")
    rescale_betas_zero_snr: bool = _h("zero terminal SNR (Lin et al. 2024; needs v_prediction)", default=False)
    snr_gamma: Optional[float] = _h("min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE", default=5.0)
    cond_dropout: float = _h("probability of an empty caption (classifier-free guidance)", default=0.1)
    DEFAULTS = dict(output_dir="outputs/t2i_fill", train_batch_size=32, max_train_steps=2000, learning_rate=1e-3,
                    lr_scheduler="cosine", lr_warmup_steps=100, adam_beta2=0.99, use_ema=True, ema_decay=0.995,
                    checkpoints_total_limit=2, tracker_project_name="train_t2i")  # shared keys, this trainer's defaults
    # validation grid
    validation_prompt: list[str] = _h("prompts of the validation grid (a row of 4 each)", default_factory=lambda: [
        "red circle with blue background", "yellow circle with black background", "white circle with green background",
        "cyan circle with brown background"])

    def __post_init__(self):
        super().__post_init__()
        if len(self.block_out_channels) != len(self.down_block_types):
            raise ValueError(f"block_out_channels {self.block_out_channels} needs one entry per down block "
                             f"({len(self.down_block_types)})")
        bad = [b for b in self.down_block_types if b not in ("DownBlock2D", "CrossAttnDownBlock2D")]
        if bad:
            raise ValueError(f"unsupported down_block_types {bad}; use DownBlock2D or CrossAttnDownBlock2D")
        check_optimizer_args({"vae_learning_rate": self.vae_learning_rate}, {}, {})
        factor = 2 ** (len(self.vae_block_out_channels) - 1)
        if self.vae_crop is not None and self.vae_crop % factor:
            raise ValueError(f"vae_crop {self.vae_crop} must be a multiple of the VAE factor {factor}")
        if self.resolution % (factor * 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by the VAE factor {factor} times the "
                             f"UNet factor {2 ** (len(self.block_out_channels) - 1)}")
        if self.vae_batch_size < 1:
            raise ValueError(f"vae_batch_size must be >= 1, got {self.vae_batch_size}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError("rescale_betas_zero_snr needs prediction_type=v_prediction (eps is undefined at SNR 0)")


def preflight(cfg: TrainT2IConfig) -> None:
    """What can be checked before a model is loaded or a file written: local dirs, a lower bound on memory."""
    if cfg.pretrained_vae:
        require_local_dir(cfg.pretrained_vae, "--pretrained_vae", ("config.json",))
    require_local_dir(cfg.train_data_dir, "--train_data_dir", model=False)
    px = 3 * cfg.resolution ** 2 * 4  # one float32 image
    need = {"input batches": (cfg.train_batch_size + cfg.vae_batch_size) * px,
            "dataset in memory": (cfg.max_train_samples or 0) * px // 4,  # uint8
            "sample grid": 4 * len(cfg.validation_prompt) * px,
            "sample time grid": 3 * 8 * (cfg.validation_inference_steps + 1)}
    check_memory(need, "lower --resolution, --train_batch_size, --vae_batch_size, --max_train_samples or "
                       "--validation_inference_steps")


class Posteriors(torch.utils.data.Dataset):
    """Items {"mean", "std", "text"}: each image's VAE posterior in scaled latent units, and its caption."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, texts: list[str]):
        self.mean, self.std, self.texts = mean, std, texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"mean": self.mean[i], "std": self.std[i], "text": self.texts[i]}


class TextToImageTask(Task):
    """UNet (and optionally the text encoder) on cached VAE posteriors; the VAE phase (a run of its own on the loop,
    in output_dir/vae_phase) runs first, in build(), inside this run's lock and after its checkpoint is vetted."""

    name = "train_t2i"
    single_process = True  # tiny CPU models

    def preflight(self):
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        preflight(self.cfg)

    def build(self):
        cfg, out = self.cfg, Path(self.cfg.output_dir)
        self.t_start = time.time()
        images, texts = load_images(cfg)
        self.accelerator.print(f"{len(texts)} training images at {cfg.resolution}x{cfg.resolution} from "
                               f"{cfg.train_data_dir}")
        self.vae, self.vae_psnr = obtain_vae(cfg, images, self.accelerator.print)
        mean, std = encode_all(self.vae, images)
        self.t_vae = time.time() - self.t_start

        torch.manual_seed(cfg.seed)
        self.tokenizer, self.text_encoder = build_text_encoder(cfg, out / "tokenizer")
        unet = build_unet(cfg, mean.shape[-1])
        self.text_encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
        modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": self.text_encoder}) \
            if cfg.train_text_encoder else unet
        sched_cfg = scheduler_config(cfg)
        self.loss_fn = DiffusionLoss(schedule_from_diffusers(sched_cfg), prediction_from_diffusers(sched_cfg),
                                     "uniform", time_input="timestep",
                                     weighting="none" if cfg.snr_gamma is None else "min_snr",
                                     min_snr_gamma=cfg.snr_gamma or 5.0)
        self.cache, self.t_unet = {}, time.time()
        return Posteriors(mean, std, texts), modules

    def parts(self, m):
        """(unet, text encoder) of the trained module (or its EMA copy)."""
        return (m["unet"], m["text_encoder"]) if self.cfg.train_text_encoder else (m, self.text_encoder)

    def text_fn(self, unet_and_te, texts):
        if self.cfg.train_text_encoder:
            return encode_text(self.tokenizer, unet_and_te[1], texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]  # frozen: one forward per caption
        if missing:
            with torch.no_grad():
                self.cache.update(zip(missing, encode_text(self.tokenizer, self.text_encoder, missing)))
        return torch.stack([self.cache[t] for t in texts])

    def loss(self, model, batch, generator):
        parts = self.parts(self.accelerator.unwrap_model(model))
        with self.accelerator.autocast():
            return denoising_loss(self.loss_fn, parts[0], lambda t: self.text_fn(parts, t), batch["mean"],
                                  batch["std"], list(batch["text"]), generator, self.cfg.cond_dropout)

    def validate(self, model, step):
        unet, te = self.parts(model)
        return sample_grid(self.cfg, unet, self.vae, te, self.tokenizer)

    def save_weights(self, directory, model, ema_model, step):
        self.parts(ema_model if ema_model is not None else model)[0].save_pretrained(directory / "unet_ema",
                                                                                     safe_serialization=True)

    def export(self, model, ema_model):
        out, net = Path(self.cfg.output_dir), ema_model if ema_model is not None else model
        unet, te = self.parts(net)
        refuse_nonfinite(net.parameters(), out / "pipeline")
        pipe_dir = save_pipeline(out / "pipeline", self.cfg, unet, self.vae, te, self.tokenizer)
        seconds = {"vae_phase": round(self.t_vae, 1), "unet_phase": round(time.time() - self.t_unet, 1),
                   "total": round(time.time() - self.t_start, 1)}
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": "done", "seconds": seconds}) + "\n")
        self.accelerator.print(f"pipeline written to {pipe_dir} (wall time {seconds})")
        return {"pipeline": pipe_dir, "vae_psnr": self.vae_psnr, "unet": unet, "seconds": seconds}


def train(cfg: TrainT2IConfig) -> dict:
    """Run (or resume) both phases; returns {"step", "losses", "pipeline" (dir), "vae_psnr", "unet", "ema", ...}."""
    return run_task(TextToImageTask(cfg))
