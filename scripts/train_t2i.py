#!/usr/bin/env python
"""Train a small text-to-image latent diffusion model (Rombach et al. 2022) from scratch, written as a diffusers
Stable Diffusion pipeline directory, on fill50k-style data (scripts/make_fill_dataset.py).

    python scripts/make_fill_dataset.py --out data/fill64 --n 6000 --size 64
    python scripts/train_t2i.py --config configs/t2i_fill.yaml [--key=value ...] [--dry-run]

Phase 1 (skipped with --pretrained_vae or when output_dir/vae exists): an AutoencoderKL trained on the images
(L1 + kl_weight * KL), latent scaling factor = 1 / std of the latent means. Phase 2: a UNet2DConditionModel on
cached VAE latents, conditioned on a frozen (or trained) small CLIPTextModel with a local BPE tokenizer; noise
schedule and prediction kind from the scheduler config (diffusion.schedule_from_diffusers), loss
diffusion.losses.DiffusionLoss (diffusion.prediction.target, optional min-SNR weighting), AdamW, EMA,
caption dropout for classifier-free guidance. Writes output_dir/{config.yaml, metrics.jsonl, logs/ (TensorBoard),
vae/, samples/step_<k>.png, checkpoints/checkpoint-<k>/ (accelerate state), pipeline/ (final diffusers
StableDiffusionPipeline layout, EMA UNet)}. --resume_from_checkpoint latest continues bit-exactly.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion import SAMPLERS, prediction_from_diffusers, schedule_from_diffusers  # noqa: E402
from diffusion.training.checkpoint import load_checkpoint, remove_incomplete, save_checkpoint, step_generator  # noqa: E402
from diffusion.training.config import option as _h, parse_config, save_yaml  # noqa: E402
from diffusion.training.ema import EMA  # noqa: E402
from diffusion.training.export import atomic_dir, open_metrics, recover_export, save_pretrained_atomic  # noqa: E402
from diffusion.training.guards import NonFiniteGuard, check_optimizer_args, refuse_nonfinite  # noqa: E402
from diffusion.training.preflight import (check_memory, check_run_args, cli_errors, load_or_explain,  # noqa: E402
                                 require_local_dir)
from diffusion.training.rundir import exclusive_output_dir, start_run  # noqa: E402
from diffusion.losses import DiffusionLoss  # noqa: E402


@dataclass
class TrainT2IConfig:
    """Train a tiny latent text-to-image model (VAE + UNet + CLIP text encoder) into a diffusers pipeline dir."""

    output_dir: str = _h("run directory (config, logs, samples, checkpoints, vae/, pipeline/)",
                         default="outputs/t2i_fill")
    seed: int = _h("seed for init, data order, noise and timesteps", default=0)
    num_threads: Optional[int] = _h("torch.set_num_threads (1 is fastest on shared CPUs; None: torch's default)",
                                    default=1)
    # data
    train_data_dir: str = _h("local fill50k (prompt.json) or imagefolder (metadata.jsonl) folder", default="data/fill64")
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
    vae_learning_rate: float = _h("VAE AdamW learning rate (cosine decay)", default=2e-3)
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
    # optimisation
    train_batch_size: int = _h("micro-batch size", default=32)
    gradient_accumulation_steps: int = _h("micro-batches per optimizer step", default=1)
    max_train_steps: int = _h("UNet optimizer steps", default=2000)
    learning_rate: float = _h("peak AdamW learning rate", default=1e-3)
    lr_scheduler: Literal["constant", "cosine", "linear"] = _h("decay after warmup", default="cosine")
    lr_warmup_steps: int = _h("linear warmup steps", default=100)
    adam_betas: tuple[float, float] = _h("AdamW betas", default=(0.9, 0.99))
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    max_grad_norm: float = _h("gradient clipping norm (0: off)", default=1.0)
    ema_decay: float = _h("EMA decay (with (1+n)/(10+n) warmup)", default=0.995)
    mixed_precision: Literal["no", "bf16", "fp16"] = _h("accelerate mixed precision", default="no")
    on_nonfinite: Literal["stop", "skip"] = _h("NaN/Inf loss or gradient (VAE and UNet phases): stop (error naming "
                                               "the step; checkpoints kept) or skip the update (diffusion.training.guards)",
                                               default="stop")
    # checkpoints, logging, samples
    checkpointing_steps: int = _h("checkpoint every N steps (and at the end)", default=500)
    checkpoints_total_limit: Optional[int] = _h("keep the newest N checkpoints (>= 1; None: keep all)", default=2)
    resume_from_checkpoint: Optional[str] = _h("'latest' or a checkpoint dir", default=None)
    allow_pickle: bool = _h("resume from a checkpoint whose files need full unpickling (can run arbitrary code: "
                            "only checkpoints you trust)", default=False)
    allow_config_change: bool = _h("resume a checkpoint saved with another config (the differing keys are printed)",
                                   default=False)
    overwrite_output_dir: bool = _h("start a new run in an output_dir holding an earlier run's checkpoints, "
                                    "deleting them", default=False)
    log_every: int = _h("TensorBoard scalars every N steps", default=10)
    tensorboard: bool = _h("write TensorBoard logs", default=True)
    progress: bool = _h("tqdm progress bars", default=True)
    validation_prompts: list[str] = _h("prompts of the sample grid", default_factory=lambda: [
        "red circle with blue background", "yellow circle with black background", "white circle with green background",
        "cyan circle with brown background"])
    validation_every: int = _h("sample grid every N steps (0: only at the end)", default=500)
    sampler: str = _h("sampler for the grid (diffusion.SAMPLERS)", default="dpmpp_2m")
    sample_steps: int = _h("sampler steps for the grid", default=20)
    guidance_scale: float = _h("classifier-free guidance scale for the grid", default=3.0)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {sorted(SAMPLERS)}")
        if len(self.block_out_channels) != len(self.down_block_types):
            raise ValueError(f"block_out_channels {self.block_out_channels} needs one entry per down block "
                             f"({len(self.down_block_types)})")
        bad = [b for b in self.down_block_types if b not in ("DownBlock2D", "CrossAttnDownBlock2D")]
        if bad:
            raise ValueError(f"unsupported down_block_types {bad}; use DownBlock2D or CrossAttnDownBlock2D")
        check_run_args(self.output_dir, self.resolution, self.checkpoints_total_limit)
        check_optimizer_args({"learning_rate": self.learning_rate, "vae_learning_rate": self.vae_learning_rate}, {},
                             {"max_grad_norm": self.max_grad_norm}, {"adam_betas": self.adam_betas},
                             {"weight_decay": self.weight_decay})
        factor = 2 ** (len(self.vae_block_out_channels) - 1)
        if self.vae_crop is not None and self.vae_crop % factor:
            raise ValueError(f"vae_crop {self.vae_crop} must be a multiple of the VAE factor {factor}")
        if self.resolution % (factor * 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by the VAE factor {factor} times the "
                             f"UNet factor {2 ** (len(self.block_out_channels) - 1)}")
        for key in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "vae_batch_size",
                    "checkpointing_steps", "log_every", "sample_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError("rescale_betas_zero_snr needs prediction_type=v_prediction (eps is undefined at SNR 0)")


# ----------------------------------------------------------------------------------------------- components
def preflight(cfg: TrainT2IConfig) -> None:
    """What can be checked before a model is loaded or a file written: local dirs, a lower bound on memory."""
    if cfg.pretrained_vae:
        require_local_dir(cfg.pretrained_vae, "--pretrained_vae", ("config.json",))
    require_local_dir(cfg.train_data_dir, "--train_data_dir", model=False)
    px = 3 * cfg.resolution ** 2 * 4  # one float32 image
    need = {"input batches": (cfg.train_batch_size + cfg.vae_batch_size) * px,
            "dataset in memory": (cfg.max_train_samples or 0) * px // 4,  # uint8
            "sample grid": 4 * len(cfg.validation_prompts) * px, "sample time grid": 3 * 8 * (cfg.sample_steps + 1)}
    check_memory(need, "lower --resolution, --train_batch_size, --vae_batch_size, --max_train_samples or "
                       "--sample_steps")


def scheduler_config(cfg: TrainT2IConfig) -> dict:
    """DDIMScheduler config (diffusers loads it; diffusion.schedule_from_diffusers reads the same table)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
            "prediction_type": cfg.prediction_type, "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing"}


def build_vae(cfg: TrainT2IConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_block_out_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         sample_size=cfg.resolution)


def build_unet(cfg: TrainT2IConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    up = tuple(b.replace("Down", "Up") for b in reversed(cfg.down_block_types))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, down_block_types=cfg.down_block_types, up_block_types=up,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_heads, norm_num_groups=cfg.norm_num_groups)


def tokenizer_words() -> list[str]:
    from make_fill_dataset import PALETTE, PROMPT_WORDS
    from make_tiny_sd import EXTRA_WORDS

    return list(PALETTE) + list(PROMPT_WORDS) + list(EXTRA_WORDS)


def build_text_encoder(cfg: TrainT2IConfig, tokenizer_dir: Path):
    """Local CLIP BPE tokenizer over the fill prompt words (scripts/make_tiny_sd.py) + a small CLIPTextModel."""
    from make_tiny_sd import BOS, EOS, write_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer(tokenizer_dir, tokenizer_words(), cfg.max_length)
    h = cfg.text_hidden_size
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=h, intermediate_size=2 * h, projection_dim=h,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_length,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    return CLIPTokenizer.from_pretrained(tokenizer_dir), model


def load_images(cfg: TrainT2IConfig) -> tuple[torch.Tensor, list[str]]:
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


# ----------------------------------------------------------------------------------------------- phase 1: VAE
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


def train_vae(cfg: TrainT2IConfig, images: torch.Tensor, log=print, guard: Optional[NonFiniteGuard] = None):
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
    for step in tqdm(range(cfg.vae_steps), desc="vae", disable=not cfg.progress):
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


# ----------------------------------------------------------------------------------------------- phase 2: UNet
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


def save_pipeline(path: Path, cfg: TrainT2IConfig, unet, vae, text_encoder, tokenizer) -> Path:
    """diffusers StableDiffusionPipeline layout (safetensors), SD1.5 tokenizer file set."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched_kw = {k: v for k, v in scheduler_config(cfg).items() if not k.startswith("_")}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**sched_kw), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    from make_tiny_sd import write_tokenizer

    with atomic_dir(path) as tmp:  # pipeline/ complete or absent, even on a kill
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # SD1.5's file set: vocab.json + merges.txt
        write_tokenizer(tmp / "tokenizer", tokenizer_words(), cfg.max_length)
    return path


def sample_grid(cfg: TrainT2IConfig, unet, vae, text_encoder, tokenizer, n_per_prompt: int = 4) -> np.ndarray:
    """Rows of samples for the validation prompts (controlnet.pipeline without a ControlNet)."""
    from controlnet.pipeline import ControlNetPipeline, image_grid

    pipe = ControlNetPipeline(unet, vae, text_encoder, tokenizer, scheduler_config(cfg))
    rows = []
    for k, prompt in enumerate(cfg.validation_prompts):
        imgs = pipe(prompt, num_images_per_prompt=n_per_prompt, sampler=cfg.sampler, steps=cfg.sample_steps,
                    guidance_scale=cfg.guidance_scale, seed=cfg.seed + 100 * k, output_type="np")
        rows.append([(im * 255).round().astype(np.uint8) for im in imgs])
    return image_grid(rows)


@exclusive_output_dir  # one run per output_dir (diffusion.training.rundir)
def train(cfg: TrainT2IConfig) -> dict:
    """Run (or resume) both phases; returns {"step", "losses", "pipeline" (dir), "vae_psnr", "unet", "ema"}."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from PIL import Image
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    preflight(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if accelerator.num_processes > 1:
        raise ValueError("train_t2i.py runs as a single process (tiny CPU models); launch without --num_processes")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete(ckpt_root)
    run = start_run(accelerator, cfg, ckpt_root)  # before the VAE phase: same run, readable, no pickle
    log = accelerator.print
    t_start = time.time()

    images, texts = load_images(cfg)
    log(f"{len(texts)} training images at {cfg.resolution}x{cfg.resolution} from {cfg.train_data_dir}")
    vae_dir, vae_psnr = Path(cfg.pretrained_vae) if cfg.pretrained_vae else recover_export(out_dir / "vae"), None
    vae_guard = NonFiniteGuard(cfg.on_nonfinite, "VAE")
    if (vae_dir / "config.json").is_file():
        vae = load_or_explain("VAE", vae_dir, lambda: AutoencoderKL.from_pretrained(vae_dir))
        log(f"using the VAE in {vae_dir}")
    else:
        vae, vae_psnr = train_vae(cfg, images, log, vae_guard)
        refuse_nonfinite(vae.parameters(), vae_dir)
        save_pretrained_atomic(vae, vae_dir, safe_serialization=True)  # vae/ complete or absent, even on a kill
    vae.requires_grad_(False).eval()
    mean, std = encode_all(vae, images)
    t_vae = time.time() - t_start

    torch.manual_seed(cfg.seed)
    tokenizer, text_encoder = build_text_encoder(cfg, out_dir / "tokenizer")
    unet = build_unet(cfg, mean.shape[-1])
    text_encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}) if cfg.train_text_encoder else unet
    ema = EMA(modules, cfg.ema_decay)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)

    def lr_lambda(step):
        warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
        p = min(1.0, max(0.0, (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)))
        return warm * {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p}[cfg.lr_scheduler]

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    modules, optimizer = accelerator.prepare(modules, optimizer)
    state_objects = {"lr_scheduler": scheduler, "ema": ema}
    step, ckpt = 0, run.checkpoint
    if ckpt is not None:
        step = int(load_checkpoint(accelerator, ckpt, state_objects, cfg.allow_pickle)["step"])
        log(f"resumed from {ckpt} at step {step}")
    save_yaml(cfg, out_dir / "config.yaml")  # only once data, VAE and checkpoint are known to fit

    sched_cfg = scheduler_config(cfg)
    schedule = schedule_from_diffusers(sched_cfg)
    loss_fn = DiffusionLoss(schedule, prediction_from_diffusers(sched_cfg), "uniform", time_input="timestep",
                            weighting="none" if cfg.snr_gamma is None else "min_snr",
                            min_snr_gamma=cfg.snr_gamma or 5.0)
    cache: dict = {}

    def text_fn(batch_texts):  # frozen encoder: one forward per distinct caption
        if cfg.train_text_encoder:
            return encode_text(tokenizer, accelerator.unwrap_model(modules)["text_encoder"], batch_texts)
        missing = [t for t in dict.fromkeys(batch_texts) if t not in cache]
        if missing:
            with torch.no_grad():
                cache.update(zip(missing, encode_text(tokenizer, text_encoder, missing)))
        return torch.stack([cache[t] for t in batch_texts])

    def parts(m):
        m = accelerator.unwrap_model(m) if m is modules else m
        return (m["unet"], m["text_encoder"]) if cfg.train_text_encoder else (m, text_encoder)

    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "logs"))
    metrics = open_metrics(out_dir / "metrics.jsonl", step)
    if vae_psnr is not None:
        metrics.write(json.dumps({"phase": "vae", "psnr": vae_psnr, "seconds": t_vae,
                                  "skipped_steps": vae_guard.skipped}) + "\n")

    def validate():
        u, te = parts(ema.module)
        grid = sample_grid(cfg, u, vae, te, tokenizer)
        (out_dir / "samples").mkdir(exist_ok=True)
        Image.fromarray(grid).save(out_dir / "samples" / f"step_{step:08d}.png")
        if writer is not None:
            writer.add_image("samples", grid, step, dataformats="HWC")

    def write_weights(d: Path):
        u, te = parts(ema.module)
        u.save_pretrained(d / "unet_ema", safe_serialization=True)

    n, bs, ga = len(texts), cfg.train_batch_size, cfg.gradient_accumulation_steps
    per_epoch = n // bs
    losses, window, micro = [], [], step * ga
    acc = torch.zeros(())
    guard = NonFiniteGuard(cfg.on_nonfinite)
    pbar = tqdm(total=cfg.max_train_steps, initial=step, desc="unet", disable=not cfg.progress)
    modules.train()
    t_unet = time.time()
    while step < cfg.max_train_steps:
        epoch, k = divmod(micro, per_epoch)  # batch k of epoch `epoch`: a function of the micro counter
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        idx = perm[k * bs:(k + 1) * bs]
        gen = step_generator(cfg.seed, micro)
        u, _ = parts(modules)
        sync = (micro + 1) % ga == 0
        with accelerator.autocast():
            loss = denoising_loss(loss_fn, u, text_fn, mean[idx], std[idx], [texts[i] for i in idx], gen,
                                  cfg.cond_dropout)
        accelerator.backward(loss / ga)
        acc += loss.detach() / ga
        micro += 1
        if not sync:
            continue
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        loss_val = acc.item()
        acc.zero_()
        # NaN/Inf: raise (stop) or drop the update (skip); fp16's GradScaler handles overflowing gradients itself
        ok = guard.check(step + 1, loss_val, None if accelerator.scaler else float(grad_norm), ckpt)
        if ok:
            optimizer.step()
            guard.check_weights(step + 1, params, ckpt)  # NaN/Inf weights from a finite update: stop
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ok:
            ema.update(accelerator.unwrap_model(modules))
        step += 1
        losses.append(loss_val)
        if ok:
            window.append(loss_val)
        rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm)} if ok else \
            {"step": step, "loss": None, "lr": lr, "grad_norm": None, "skipped": True}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
        if writer is not None and window and (step % cfg.log_every == 0 or step == cfg.max_train_steps):
            writer.add_scalar("train/loss", sum(window) / len(window), step)
            writer.add_scalar("train/lr", lr, step)
            window = []
        if (cfg.validation_every and step % cfg.validation_every == 0) or step == cfg.max_train_steps:
            validate()
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            refuse_nonfinite(params, ckpt_root / f"checkpoint-{step:08d}", step)
            ckpt = save_checkpoint(accelerator, ckpt_root, step, {"micro_step": micro}, write_weights,
                                   cfg.checkpoints_total_limit, state_objects, run.identity)
    pbar.close()
    u, te = parts(ema.module)
    refuse_nonfinite(ema.module.parameters(), out_dir / "pipeline")
    pipe_dir = save_pipeline(out_dir / "pipeline", cfg, u, vae, te, tokenizer)
    seconds = {"vae_phase": round(t_vae, 1), "unet_phase": round(time.time() - t_unet, 1),
               "total": round(time.time() - t_start, 1)}
    metrics.write(json.dumps({"phase": "done", "step": step, "seconds": seconds}) + "\n")
    metrics.close()
    if writer is not None:
        writer.close()
    accelerator.end_training()
    log(f"pipeline written to {pipe_dir} (wall time {seconds})")
    return {"step": step, "losses": losses, "pipeline": pipe_dir, "vae_psnr": vae_psnr, "checkpoint": ckpt,
            "unet": u, "ema": ema.module, "seconds": seconds}


def main(argv=None) -> dict:
    cfg = parse_config(TrainT2IConfig, argv, prog="train_t2i.py")
    with cli_errors("train_t2i.py"):  # bad input: `error: ...`, exit 2 (as a bad flag); divergence: exit 1
        return train(cfg)


if __name__ == "__main__":
    main()
