"""Rectified-flow DiT / MM-DiT / SD3-transformer trainer (Esser et al. 2024) on accelerate.

    accelerate launch scripts/train_rf_dit.py --config configs/rf_dit_digits.yaml [--key=value ...]
    python scripts/train_rf_dit.py --config configs/rf_dit_digits.yaml --max_steps 100 --dry-run

Objective: diffusion.losses.DiffusionLoss (any schedule x prediction kind; default rectified flow +
velocity + logit-normal t). Writes output_dir/{config.yaml, metrics.jsonl, logs/ (TensorBoard),
samples/, checkpoints/checkpoint-N/ (accelerate state + denoiser[_ema].safetensors with the
resolved config in their metadata)}. --resume_from_checkpoint latest continues bit-exactly.
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion import (SAMPLERS, classifier_free_guidance, generators_from_seeds, get_schedule,  # noqa: E402
                       prior_sample, sample, wrap_model)
from diffusion.training.checkpoint import (load_checkpoint, load_weights, remove_incomplete, resolve_checkpoint,  # noqa: E402
                                  save_checkpoint, save_weights, step_generator)
from diffusion.training.config import from_dict, option as _h, parse_config, save_yaml, to_json  # noqa: E402
from diffusion.models.dit import DIT_MODELS, build_dit  # noqa: E402
from diffusion.training.ema import EMA  # noqa: E402
from diffusion.training.export import open_metrics, save_pretrained_atomic  # noqa: E402
from diffusion.training.guards import NonFiniteGuard, check_optimizer_args, refuse_nonfinite  # noqa: E402
from diffusion.training.preflight import check_memory, check_run_args, cli_errors, load_or_explain, require_local_dir  # noqa
from diffusion.training.rundir import exclusive_output_dir, start_run  # noqa: E402
from diffusion.models.latents import sample_latents  # noqa: E402
from diffusion.losses import DiffusionLoss  # noqa: E402
from diffusion.models.mmdit import MMDIT_MODELS, build_mmdit  # noqa: E402
from diffusion.models.sd3_backbone import SD3Backbone  # noqa: E402


@dataclass
class TrainConfig:
    """Rectified-flow (SD3) trainer for DiT / MM-DiT / diffusers SD3Transformer2DModel."""

    output_dir: str = _h("run directory (config, logs, samples, checkpoints)", default="outputs/rf_dit")
    seed: int = _h("seed for init, data order and noise", default=0)
    # data
    dataset: Literal["digits", "shapes", "folder"] = _h("digits (sklearn, class labels), shapes (captions), "
                                                        "folder (data_dir)", default="digits")
    data_dir: Optional[str] = _h("image folder for dataset=folder (optional metadata.jsonl)", default=None)
    resolution: int = _h("image size in pixels", default=16)
    channels: int = _h("image channels for dataset=folder (1 or 3)", default=3)
    num_shapes: int = _h("number of generated shape images for dataset=shapes", default=4000)
    vae: Optional[str] = _h("local diffusers AutoencoderKL dir: train on cached latents", default=None)
    latent_cache: Optional[str] = _h("latent cache file (default output_dir/latents.safetensors)", default=None)
    num_workers: int = _h("DataLoader workers", default=0)
    # model
    backbone: Literal["dit", "mmdit", "sd3"] = _h("dit (class labels), mmdit (text), sd3 (diffusers "
                                                  "SD3Transformer2DModel, text)", default="dit")
    model: str = _h("DiT / MMDiT size name (diffusion.models.dit.DIT_MODELS, diffusion.models.mmdit.MMDIT_MODELS)",
                    default="DiT-S/2")
    depth: Optional[int] = _h("override the model depth", default=None)
    hidden_size: Optional[int] = _h("override the hidden size", default=None)
    num_heads: Optional[int] = _h("override the number of heads", default=None)
    pretrained_transformer: Optional[str] = _h("backbone=sd3: local SD3Transformer2DModel dir (or pipeline dir)",
                                               default=None)
    text_encoder: str = _h("'tiny' (CLIPTextModel + word tokenizer built locally) or a local CLIP dir",
                           default="tiny")
    text_hidden_size: int = _h("hidden size of the tiny text encoder", default=64)
    gradient_checkpointing: bool = _h("recompute blocks in backward", default=False)
    # objective
    schedule: str = _h("noise schedule (diffusion.get_schedule): rectified_flow, vp_linear, cosine, ...",
                       default="rectified_flow")
    prediction: Literal["velocity", "eps", "v", "x0"] = _h("training target kind", default="velocity")
    time_input: Literal["t1000", "t", "timestep", "log_snr", "auto"] = _h(
        "time signal fed to the network (DiT / SD3 expect t1000; timestep = integer table index)", default="t1000")
    density: Literal["uniform", "logit_normal", "mode", "cosmap"] = _h("timestep density (SD3 Sec. 3.1)",
                                                                       default="logit_normal")
    logit_mean: float = _h("logit-normal location m", default=0.0)
    logit_std: float = _h("logit-normal scale s", default=1.0)
    mode_scale: float = _h("mode density scale s (SD3 eq. 20)", default=1.29)
    shift: float = _h("SD3 time shift for training and sampling (rectified_flow; see resolution_shift)",
                      default=1.0)
    sample_shift: Optional[float] = _h("shift used for sampling only (default: shift)", default=None)
    weighting: Literal["none", "min_snr"] = _h("loss weighting", default="none")
    min_snr_gamma: float = _h("gamma of min-SNR weighting", default=5.0)
    cond_dropout: float = _h("probability of dropping the label/caption (classifier-free guidance)", default=0.1)
    # optimization
    batch_size: int = _h("micro-batch size per process", default=64)
    gradient_accumulation_steps: int = _h("micro-batches per optimizer step", default=1)
    max_steps: int = _h("optimizer steps", default=2000)
    learning_rate: float = _h("peak AdamW learning rate", default=3e-4)
    adam_betas: tuple[float, float] = _h("AdamW betas", default=(0.9, 0.999))
    adam_eps: float = _h("AdamW eps", default=1e-8)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = _h("LR decay after warmup", default="constant")
    lr_warmup_steps: int = _h("linear warmup steps", default=100)
    max_grad_norm: float = _h("gradient clipping norm (0 = off)", default=1.0)
    ema_decay: float = _h("EMA decay (with (1+n)/(10+n) warmup)", default=0.999)
    mixed_precision: Literal["no", "bf16", "fp16"] = _h("accelerate mixed precision (bf16 works on CPU)",
                                                        default="no")
    on_nonfinite: Literal["stop", "skip"] = _h("NaN/Inf loss or gradient: stop (error naming the step; checkpoints "
                                               "kept) or skip the update (diffusion.training.guards)", default="stop")
    # checkpoints, logging, samples
    checkpointing_steps: int = _h("save a checkpoint every N steps (and at the end)", default=500)
    checkpoints_total_limit: Optional[int] = _h("keep the newest N checkpoints (>= 1; None = all)", default=3)
    resume_from_checkpoint: Optional[str] = _h("'latest' or a checkpoint directory", default=None)
    allow_pickle: bool = _h("resume from a checkpoint whose files need full unpickling (can run arbitrary code: "
                            "only checkpoints you trust)", default=False)
    allow_config_change: bool = _h("resume a checkpoint saved with another config (the differing keys are printed)",
                                   default=False)
    overwrite_output_dir: bool = _h("start a new run in an output_dir holding an earlier run's checkpoints, "
                                    "deleting them", default=False)
    log_every: int = _h("TensorBoard scalars every N steps", default=10)
    ddp_timeout: int = _h("seconds a process waits for the others at a collective (multi-process; accelerate's "
                          "InitProcessGroupKwargs) before failing", default=1800)
    sample_every: int = _h("sample grid every N steps (0 = only at the end)", default=500)
    sampler: str = _h("sampler for the grid (diffusion.SAMPLERS)", default="flow_euler")
    sample_steps: int = _h("sampler steps for the grid", default=20)
    cfg_scale: float = _h("classifier-free guidance scale for the grid", default=2.0)
    samples_per_class: int = _h("grid rows (per class / prompt)", default=4)
    sample_seed: int = _h("seed of the grid's starting noise", default=0)
    tensorboard: bool = _h("write TensorBoard logs", default=True)
    progress: bool = _h("tqdm progress bar", default=True)

    def __post_init__(self):
        names = {"dit": DIT_MODELS, "mmdit": MMDIT_MODELS}.get(self.backbone)
        if names is not None and self.model not in names:
            raise ValueError(f"model {self.model!r} is not a {self.backbone} size; valid: {list(names)}")
        if self.backbone == "sd3" and not self.pretrained_transformer:
            raise ValueError("backbone=sd3 needs --pretrained_transformer DIR (a local SD3Transformer2DModel)")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset=folder needs --data_dir DIR")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {sorted(SAMPLERS)}")
        get_schedule(self.schedule)  # validates the name
        if self.shift != 1.0 and get_schedule(self.schedule).name != "rectified_flow":
            raise ValueError("shift applies to the rectified_flow schedule only; leave shift=1")
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "resolution"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 disables guidance), got {self.cfg_scale}")
        check_run_args(self.output_dir, self.resolution, self.checkpoints_total_limit, self.ddp_timeout)
        check_optimizer_args({"learning_rate": self.learning_rate}, {"adam_eps": self.adam_eps},
                             {"max_grad_norm": self.max_grad_norm}, {"adam_betas": self.adam_betas},
                             {"weight_decay": self.weight_decay})
        p = names[self.model].keywords.get("patch_size", 2) if names else None  # DiT / MMDiT default: 2
        if p and not self.vae and self.resolution % p:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the patch size {p} of {self.model}; "
                             f"use e.g. --resolution {max(p, p * round(self.resolution / p))}")


# ----------------------------------------------------------------------------------------------- building
def preflight(cfg: TrainConfig) -> None:
    """What can be checked before a model is loaded or a file written: local dirs, a lower bound on memory."""
    if cfg.vae:
        require_local_dir(cfg.vae, "--vae", ("config.json",))
    if cfg.pretrained_transformer:
        d = require_local_dir(cfg.pretrained_transformer, "--pretrained_transformer")
        require_local_dir(d / "transformer" if (d / "transformer").is_dir() else d, "--pretrained_transformer",
                          ("config.json",))
    if cfg.text_encoder != "tiny":
        require_local_dir(cfg.text_encoder, "--text_encoder", ("config.json",))
    if cfg.dataset == "folder":
        require_local_dir(cfg.data_dir, "--data_dir", model=False)
    c, px = (1 if cfg.dataset == "digits" else 3), cfg.resolution ** 2 * 4  # float32
    need = {"input batch": cfg.batch_size * c * px,
            "dataset in memory": {"digits": 1797, "shapes": cfg.num_shapes}.get(cfg.dataset, 0) * c * px,
            "sample grid": 10 * cfg.samples_per_class * c * px, "sample time grid": 3 * 8 * (cfg.sample_steps + 1)}
    check_memory(need, "lower --resolution, --batch_size, --num_shapes, --samples_per_class or --sample_steps")


def make_schedule(cfg: TrainConfig, sampling: bool = False):
    if get_schedule(cfg.schedule).name == "rectified_flow":
        s = cfg.sample_shift if sampling and cfg.sample_shift is not None else cfg.shift
        return get_schedule(cfg.schedule, shift=s)
    return get_schedule(cfg.schedule)


def build_dataset(cfg: TrainConfig, accelerator=None):
    """(dataset, codec | None, class_names | None, texts | None) in the space the model trains in."""
    from diffusion.training.data import DigitsDataset, ImageFolderDataset, ShapesDataset

    if cfg.dataset == "digits":
        ds = DigitsDataset(cfg.resolution, "train")
        names = [str(i) for i in range(10)]
    elif cfg.dataset == "shapes":
        ds, names = ShapesDataset(cfg.num_shapes, cfg.resolution, seed=0), None
    else:
        ds = ImageFolderDataset(cfg.data_dir, cfg.resolution, cfg.channels)
        names = ds.class_names or None
    texts = getattr(ds, "texts", None)
    codec = None
    if cfg.vae:
        from diffusion.models.latents import LatentDataset, VAECodec, cache_latents

        device = accelerator.device if accelerator else "cpu"
        codec = VAECodec.from_pretrained(cfg.vae, device=device)
        path = Path(cfg.latent_cache or Path(cfg.output_dir) / "latents.safetensors")
        key = f"{cfg.dataset}|{cfg.data_dir}|{cfg.resolution}|{cfg.num_shapes}|{cfg.channels}"
        main = accelerator is None or accelerator.is_main_process
        if main:
            ds = cache_latents(ds, codec, path, key=key, progress=cfg.progress)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if not main:
            ds = LatentDataset(path)
    return ds, codec, names, texts


def build_text_encoder(cfg: TrainConfig, texts, names):
    from diffusion.models.text_encoder import TextEncoder

    if cfg.text_encoder != "tiny":
        return TextEncoder.from_pretrained(cfg.text_encoder)
    words = {w for t in (texts or names or []) for w in t.lower().split()}
    return TextEncoder.tiny(sorted(words), hidden_size=cfg.text_hidden_size, seed=cfg.seed)


def model_spec(cfg: TrainConfig, x_shape, num_classes: int, text_dims=None) -> dict:
    """Everything needed to rebuild the network (stored in the weights' metadata)."""
    over = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads") if getattr(cfg, k) is not None}
    c, h = x_shape[0], x_shape[-1]
    if cfg.backbone == "dit":
        return {"backbone": "dit", "name": cfg.model, "kwargs": {"input_size": h, "in_channels": c,
                "num_classes": num_classes, "class_dropout_prob": 0.0, **over}}
    if cfg.backbone == "mmdit":
        return {"backbone": "mmdit", "name": cfg.model, "kwargs": {"input_size": h, "in_channels": c,
                "joint_attention_dim": text_dims[0], "pooled_projection_dim": text_dims[1], **over}}
    from diffusers import SD3Transformer2DModel

    path = Path(cfg.pretrained_transformer)
    path = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    config = dict(SD3Transformer2DModel.load_config(path))
    if config["in_channels"] != c:
        raise ValueError(f"SD3 transformer expects {config['in_channels']} input channels but the data has {c} "
                         f"(pass --vae for the matching latent space)")
    return {"backbone": "sd3", "path": str(path), "config": {k: v for k, v in config.items() if not k.startswith("_")}}


def build_model(spec: dict, pretrained: bool = True) -> torch.nn.Module:
    if spec["backbone"] == "dit":
        return build_dit(spec["name"], **spec["kwargs"])
    if spec["backbone"] == "mmdit":
        return build_mmdit(spec["name"], **spec["kwargs"])
    from diffusers import SD3Transformer2DModel

    if pretrained:
        return SD3Backbone(SD3Transformer2DModel.from_pretrained(spec["path"]))
    return SD3Backbone(SD3Transformer2DModel.from_config(spec["config"]))


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
        if cfg.lr_scheduler == "constant":
            return warm
        p = min(1.0, max(0.0, (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps)))
        return warm * (0.5 * (1 + math.cos(math.pi * p)) if cfg.lr_scheduler == "cosine" else 1 - p)
    return f


# ----------------------------------------------------------------------------------------------- conditioning
class Conditioner:
    """Batch -> network keyword inputs with CFG dropout (null class / empty-prompt embeddings)."""

    def __init__(self, backbone: str, num_classes: int, names, text_encoder=None, device="cpu"):
        self.backbone, self.num_classes, self.names, self.te = backbone, num_classes, names, text_encoder
        self.device = device
        if text_encoder is not None:
            text_encoder.model.to(device)
            self.null = text_encoder([""])

    def texts_of(self, batch) -> list[str]:
        if "text" in batch:
            return list(batch["text"])
        if "label" in batch and self.names:
            return [self.names[int(i)] for i in batch["label"]]
        raise ValueError("a text-conditioned backbone needs captions (or class labels) in the dataset")

    def __call__(self, batch, drop_prob: float = 0.0, generator=None) -> dict:
        b = len(batch["x"])
        drop = torch.rand(b, generator=generator) < drop_prob if drop_prob > 0 else torch.zeros(b, dtype=torch.bool)
        if self.te is None:
            if self.num_classes == 0:
                return {}
            y = torch.as_tensor(batch["label"]).long()
            return {"y": torch.where(drop, torch.full_like(y, self.num_classes), y).to(self.device)}
        h, p = self.te(self.texts_of(batch))
        d = drop.to(self.device)
        return {"encoder_hidden_states": torch.where(d[:, None, None], self.null[0], h),
                "pooled_projections": torch.where(d[:, None], self.null[1], p)}

    def uncond(self) -> dict:
        if self.te is None:
            return {"y": torch.tensor([self.num_classes], device=self.device)} if self.num_classes else {}
        return {"encoder_hidden_states": self.null[0], "pooled_projections": self.null[1]}


def sample_images(net, cfg: TrainConfig, conditioner: Conditioner, codec, x_shape, labels=None, texts=None,
                  seed: int = 0, cfg_scale: float | None = None, sampler: str | None = None,
                  steps: int | None = None, batch_size: int = 256, num: int = 1) -> torch.Tensor:
    """Generate images in [-1, 1] with diffusion.sample (CFG against the null class / empty prompt):
    one per label / text, or `num` unconditional ones; sample i starts from seed + i."""
    schedule = make_schedule(cfg, sampling=True)
    device = next(net.parameters()).device
    model_fn = wrap_model(net, schedule, prediction=cfg.prediction, time_input=cfg.time_input)
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    n = len(labels) if labels is not None else len(texts) if texts is not None else num
    if conditioner.uncond() and scale != 1.0:
        model_fn = classifier_free_guidance(model_fn, scale, uncond=conditioner.uncond())
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        batch = {"x": torch.empty(hi - lo)}
        if labels is not None:
            batch["label"] = torch.as_tensor(labels[lo:hi])
        if texts is not None:
            batch["text"] = texts[lo:hi]
        cond = conditioner(batch)
        gens = generators_from_seeds([seed + i for i in range(lo, hi)])  # prior + sampler noise: one stream each
        x_T = prior_sample((hi - lo, *x_shape), schedule, generator=gens, device=device)
        with torch.no_grad():
            x0 = sample(model_fn, x_T, schedule, sampler=sampler or cfg.sampler, steps=steps or cfg.sample_steps,
                        cond=cond, generator=gens)
        out.append(codec.decode(x0).cpu() if codec is not None else x0.clamp(-1, 1).cpu())
    return torch.cat(out)


def make_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', 3) grid with nrow images per row."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def grid_conditions(cfg: TrainConfig, num_classes: int, names, texts):
    """Fixed grid contents: every class x samples_per_class, or the first distinct captions."""
    if cfg.backbone == "dit":
        if num_classes == 0:  # unconditional
            return {"num": 8 * cfg.samples_per_class}, 8
        return {"labels": list(range(num_classes)) * cfg.samples_per_class}, num_classes
    prompts = list(dict.fromkeys(texts))[:8] if texts else list(names or [])[:10]
    return {"texts": prompts * cfg.samples_per_class}, len(prompts)


# ----------------------------------------------------------------------------------------------- training
@exclusive_output_dir  # one run per output_dir (diffusion.training.rundir)
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {"step", "losses" (this run), "checkpoint", "model", "ema"}."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    preflight(cfg)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    # several processes without a GPU (torchrun / MULTI_CPU): accelerate needs cpu=True to use gloo DDP
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=multi_cpu,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))])
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(ckpt_root)
    run = start_run(accelerator, cfg, ckpt_root)  # before anything is written: same run, readable, no pickle
    set_seed(cfg.seed)

    ds, codec, names, texts = build_dataset(cfg, accelerator)
    x_shape = tuple(ds[0]["x"].shape)
    has_labels = "label" in ds[0]
    num_classes = len(names) if (cfg.backbone == "dit" and has_labels and names) else 0
    te = None
    if cfg.backbone != "dit":
        te = build_text_encoder(cfg, texts, names)
        if main and cfg.text_encoder == "tiny":
            save_pretrained_atomic(te, out_dir / "text_encoder")
    elif "text" in ds[0] and not has_labels:
        raise ValueError("dataset has captions but backbone=dit is class-conditional: use --backbone mmdit")
    spec = model_spec(cfg, x_shape, num_classes, (te.hidden_size, te.hidden_size) if te else None)
    torch.manual_seed(cfg.seed)
    model = load_or_explain("SD3 transformer", cfg.pretrained_transformer, lambda: build_model(spec)) \
        if cfg.backbone == "sd3" else build_model(spec)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = EMA(model, cfg.ema_decay).to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    state_objects = {"lr_scheduler": scheduler, "ema": ema}  # scheduler not prepared: stepped once per optimizer step

    step, ckpt = 0, run.checkpoint
    if ckpt is not None:
        step = int(load_checkpoint(accelerator, ckpt, state_objects, cfg.allow_pickle)["step"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no complete checkpoint under {ckpt_root}: starting from scratch")
    if main:  # only once the model and checkpoint are known to fit: a failed start leaves the run dir as it was
        save_yaml(cfg, out_dir / "config.yaml")

    conditioner = Conditioner(cfg.backbone, num_classes, names, te, accelerator.device)
    loss_fn = DiffusionLoss(make_schedule(cfg), cfg.prediction, cfg.density, logit_mean=cfg.logit_mean,
                            logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, weighting=cfg.weighting,
                            min_snr_gamma=cfg.min_snr_gamma, time_input=cfg.time_input)
    from diffusion.training.data import EpochBatchSampler

    batches = EpochBatchSampler(len(ds), cfg.batch_size, cfg.seed, accelerator.process_index,
                                accelerator.num_processes)
    # own generator: the loader's per-epoch seed draw must not advance the (checkpointed) global RNG
    loader = DataLoader(ds, batch_sampler=batches, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    ga = cfg.gradient_accumulation_steps
    micro = step * ga  # data position and noise are functions of the micro-batch counter
    epoch, offset = divmod(micro, len(batches))

    writer = None
    if main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "logs"))
    metrics = open_metrics(out_dir / "metrics.jsonl", step) if main else None
    grid_cond, nrow = grid_conditions(cfg, num_classes, names, texts)
    meta = {"config": to_json(cfg), "model_spec": json.dumps(spec), "format": "diffusion.rf_dit"}

    def write_weights(d: Path):
        m = {**meta, "step": str(step)}
        save_weights(accelerator.unwrap_model(model).state_dict(), d / "denoiser.safetensors", m)
        save_weights(ema.module.state_dict(), d / "denoiser_ema.safetensors", m)
        save_yaml(cfg, d / "config.yaml")

    def sample_grid():
        imgs = sample_images(ema.module, cfg, conditioner, codec, x_shape, labels=grid_cond.get("labels"),
                             texts=grid_cond.get("texts"), seed=cfg.sample_seed, num=grid_cond.get("num", 1))
        grid = make_grid(imgs, nrow)
        (out_dir / "samples").mkdir(exist_ok=True)
        from PIL import Image
        Image.fromarray(grid).save(out_dir / "samples" / f"step_{step:08d}.png")
        if writer is not None:
            writer.add_image("samples", grid, step, dataformats="HWC")

    losses, last_ckpt, window = [], ckpt, []
    guard = NonFiniteGuard(cfg.on_nonfinite)
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not (main and cfg.progress), desc="train")
    model.train()
    acc_loss = torch.zeros((), device=accelerator.device)
    while step < cfg.max_steps:
        batches.set_epoch(epoch, offset)
        offset = 0
        for batch in loader:
            gen = step_generator(cfg.seed, micro, accelerator.process_index)
            cond = conditioner(batch, cfg.cond_dropout, gen)
            x0 = sample_latents(batch, gen).to(accelerator.device)  # VAE latents: a posterior sample
            sync = (micro + 1) % ga == 0
            with nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model):
                loss = loss_fn(model, x0, generator=gen, **cond)
                accelerator.backward(loss / ga)
            acc_loss += loss.detach() / ga
            micro += 1
            if not sync:
                continue
            if cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            lr = scheduler.get_last_lr()[0]
            loss_val = accelerator.reduce(acc_loss, "mean").item()
            acc_loss.zero_()
            # NaN/Inf: raise (stop) or drop the update (skip); fp16's GradScaler handles overflowing gradients itself
            ok = guard.check(step + 1, loss_val, None if accelerator.scaler else float(grad_norm), last_ckpt)
            if ok:
                optimizer.step()
                guard.check_weights(step + 1, params, last_ckpt)  # NaN/Inf weights from a finite update: stop
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ok:
                ema.update(accelerator.unwrap_model(model))
            step += 1
            losses.append(loss_val)
            if ok:
                window.append(loss_val)
            if main:
                rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm)} if ok else \
                    {"step": step, "loss": None, "lr": lr, "grad_norm": None, "skipped": True}
                metrics.write(json.dumps(rec) + "\n")
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
                if writer is not None and window and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    writer.add_scalar("train/loss", sum(window) / len(window), step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                    window = []
                if (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.max_steps:
                    sample_grid()
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
                refuse_nonfinite(params, ckpt_root / f"checkpoint-{step:08d}", step)
                last_ckpt = save_checkpoint(accelerator, ckpt_root, step, {"micro_step": micro}, write_weights,
                                            cfg.checkpoints_total_limit, state_objects, run.identity)
            if step >= cfg.max_steps:
                break
        epoch += 1
    pbar.close()
    if main:
        metrics.close()
        if writer is not None:
            writer.close()
        if cfg.backbone == "sd3":  # diffusers-format export of the EMA transformer
            refuse_nonfinite(ema.module.parameters(), out_dir / "transformer_ema")
            save_pretrained_atomic(ema.module.transformer, out_dir / "transformer_ema")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "losses": losses, "checkpoint": last_ckpt, "model": accelerator.unwrap_model(model),
            "ema": ema.module}


# ----------------------------------------------------------------------------------------------- loading
def load_trained(path, ema: bool = True, device="cpu"):
    """Rebuild a trained network from a checkpoint dir (or run dir: its newest checkpoint) or a
    denoiser[_ema].safetensors file -> (net, cfg, extras {conditioner, codec, names, texts, x_shape})."""
    path = Path(path)
    if path.is_dir() and not (path / "denoiser.safetensors").is_file():
        path = resolve_checkpoint("latest", path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if path is None:
            raise ValueError("no complete checkpoint found")
    if path.is_dir():
        path = path / ("denoiser_ema.safetensors" if ema else "denoiser.safetensors")
    state, meta = load_weights(path)
    if meta.get("format") != "diffusion.rf_dit":
        raise ValueError(f"{path} was not written by train_rf_dit.py (no config metadata)")
    cfg = from_dict(TrainConfig, json.loads(meta["config"]), strict=False)
    spec = json.loads(meta["model_spec"])
    net = build_model(spec, pretrained=False)
    net.load_state_dict(state)
    net.to(device).eval().requires_grad_(False)
    ds, codec, names, texts = build_dataset(cfg)
    te = None
    if spec["backbone"] != "dit":
        from diffusion.models.text_encoder import TextEncoder
        run_te = Path(cfg.output_dir) / "text_encoder"
        te = TextEncoder.from_pretrained(run_te) if cfg.text_encoder == "tiny" and run_te.is_dir() else \
            build_text_encoder(cfg, texts, names)
    num_classes = spec["kwargs"].get("num_classes", 0) if spec["backbone"] == "dit" else 0
    conditioner = Conditioner(spec["backbone"], num_classes, names, te, device)
    return net, cfg, {"conditioner": conditioner, "codec": codec, "names": names, "texts": texts,
                      "x_shape": tuple(ds[0]["x"].shape), "step": int(meta.get("step", 0))}


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, prog="train_rf_dit.py")
    with cli_errors("train_rf_dit.py"):  # bad input: `error: ...`, exit 2 (as a bad flag); divergence: exit 1
        result = train(cfg)
    print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")


if __name__ == "__main__":
    main()
