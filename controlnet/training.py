"""ControlNet training on a frozen Stable-Diffusion-layout model (Zhang, Rao & Agrawala 2023), on accelerate.

Only the ControlNet learns; UNet, VAE and text encoder are frozen (requires_grad False, eval, no graph for the
encoders). Noise schedule and prediction kind come from the pipeline's scheduler config (diffusion core):
integer timesteps n ~ U{0..N-1} as in diffusers, t = schedule.t_from_timestep(n), x_t = schedule.add_noise.
Gradient accumulation is counted in micro-batches: the data position and all noise are functions of the
micro-batch counter (diffusion.training.checkpoint.step_generator), so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from diffusion import SAMPLERS, Discrete, target
from diffusion.training.checkpoint import list_checkpoints, load_checkpoint, remove_incomplete, save_checkpoint, step_generator
from diffusion.training.config import option as _h, save_yaml, to_dict
from diffusion.training.export import open_metrics, save_into
from diffusion.training.guards import NonFiniteGuard, check_optimizer_args, grad_norm, refuse_nonfinite
from diffusion.training.preflight import (GIB, check_memory, check_run_args, load_or_explain, require_local_dir,
                                 require_package)
from diffusion.training.rundir import exclusive_output_dir, start_run

from .config import ControlNetConfig, unet_mismatches
from .data import CONDITIONING_MODES, ControlNetDataset, build_rows, collate, load_rgb, resize_center_crop
from .model import ControlNet
from .pipeline import ControlNetPipeline, controlled_unet, image_grid, load_components

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class TrainControlNetConfig:
    """Train a ControlNet on a frozen local Stable Diffusion pipeline directory (argument names as in the diffusers
    train_controlnet.py example)."""

    pretrained_model_name_or_path: str = _h("local diffusers-format SD pipeline dir (unet/ vae/ text_encoder/ "
                                            "tokenizer/ scheduler/)")
    controlnet_model_name_or_path: Optional[str] = _h("ControlNet dir to start from (default: copy of the UNet "
                                                      "encoder, zero convolutions)", default=None)
    output_dir: str = _h("where checkpoints, logs, validation grids and the final ControlNet go",
                         default="controlnet-model")
    seed: int = _h("seed for ControlNet init, data order, noise, timesteps and validation", default=0)
    # data
    train_data_dir: Optional[str] = _h("local folder: fill50k layout (prompt.json) or imagefolder (metadata.jsonl)",
                                       default=None)
    dataset_name: Optional[str] = _h("a local .json/.jsonl/.csv/.parquet file, or a datasets.load_dataset name or "
                                     "local dir (needs the 'datasets' package; offline: local or cached only)",
                                     default=None)
    dataset_config_name: Optional[str] = _h("dataset config name for dataset_name", default=None)
    cache_dir: Optional[str] = _h("datasets cache dir", default=None)
    data_files: list[str] = _h("local .json/.jsonl/.csv/.parquet files of rows, image paths relative to each file "
                               "(file names relative to train_data_dir when given)", default_factory=list)
    image_column: str = _h("column with the target image (imagefolder: 'file_name' is accepted)", default="image")
    conditioning_image_column: str = _h("column with the condition image", default="conditioning_image")
    caption_column: str = _h("column with the caption", default="text")
    conditioning: Literal["auto", "dataset", "canny"] = _h(
        "condition source: dataset images (every row needs one), canny (computed from the image on the fly, only "
        "when asked), auto (= dataset)",
        default="auto")
    canny_low_threshold: int = _h("Canny low threshold (conditioning=canny)", default=100)
    canny_high_threshold: int = _h("Canny high threshold (conditioning=canny)", default=200)
    skip_bad_images: bool = _h("skip (and count) unreadable images instead of failing", default=False)
    max_train_samples: Optional[int] = _h("use only the first N samples (debugging)", default=None)
    resolution: int = _h("training resolution (short side resize + center crop); multiple of 8", default=512)
    proportion_empty_prompts: float = _h("fraction of captions replaced by '' (CFG training)", default=0.0)
    dataloader_num_workers: int = _h("DataLoader worker processes (0: load in the main process)", default=0)
    # optimisation
    train_batch_size: int = _h("micro-batch size per process", default=4)
    gradient_accumulation_steps: int = _h("micro-batches per optimizer step", default=1)
    num_train_epochs: int = _h("epochs (ignored when max_train_steps is set)", default=1)
    max_train_steps: Optional[int] = _h("optimizer steps (overrides num_train_epochs)", default=None)
    learning_rate: float = _h("AdamW learning rate (after warmup)", default=5e-6)
    scale_lr: bool = _h("multiply learning_rate by accumulation x batch size x processes", default=False)
    lr_scheduler: str = field(default="constant", metadata={"help": "learning-rate schedule (diffusers "
                                                            "get_scheduler)", "choices": LR_SCHEDULERS})
    lr_warmup_steps: int = _h("warmup steps of the learning-rate schedule", default=500)
    lr_num_cycles: int = _h("cycles of cosine_with_restarts", default=1)
    lr_power: float = _h("power of the polynomial schedule", default=1.0)
    use_8bit_adam: bool = _h("bitsandbytes 8-bit AdamW (optional dependency)", default=False)
    adam_beta1: float = _h("AdamW beta1", default=0.9)
    adam_beta2: float = _h("AdamW beta2", default=0.999)
    adam_weight_decay: float = _h("AdamW weight decay", default=1e-2)
    adam_epsilon: float = _h("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _h("gradient clipping norm (0: off)", default=1.0)
    gradient_checkpointing: bool = _h("recompute ControlNet and UNet activations in backward", default=False)
    set_grads_to_none: bool = _h("zero_grad(set_to_none=True): frees gradient memory between steps",
                                 default=False)
    mixed_precision: Literal["no", "fp16", "bf16"] = _h("frozen models in this dtype, autocast for the forward "
                                                        "(bf16 works on CPU)", default="no")
    on_nonfinite: Literal["stop", "skip"] = _h("NaN/Inf loss or gradient: stop (error naming the step; checkpoints "
                                               "kept) or skip the update (diffusion.training.guards)", default="stop")
    # checkpoints and logging
    checkpointing_steps: int = _h("save output_dir/checkpoint-<step> every N optimizer steps (and at the end)",
                                  default=500)
    checkpoints_total_limit: Optional[int] = _h("keep only the newest N checkpoints (>= 1; None: keep all)",
                                                default=None)
    resume_from_checkpoint: Optional[str] = _h("'latest' or a checkpoint dir (name under output_dir or a path)",
                                               default=None)
    allow_pickle: bool = _h("resume from a checkpoint whose files need full unpickling (can run arbitrary code: "
                            "only checkpoints you trust)", default=False)
    allow_config_change: bool = _h("resume a checkpoint saved with another config (the differing keys are printed)",
                                   default=False)
    overwrite_output_dir: bool = _h("start a new run in an output_dir holding an earlier run's checkpoints, "
                                    "deleting them", default=False)
    report_to: Literal["tensorboard", "none", "all", "wandb"] = _h("accelerate tracker for losses and images",
                                                                   default="tensorboard")
    tracker_project_name: str = _h("tracker run name (TensorBoard subdir of logging_dir)", default="train_controlnet")
    logging_dir: str = _h("tracker directory, relative to output_dir", default="logs")
    logging_steps: int = _h("print the loss every N steps", default=10)
    ddp_timeout: int = _h("seconds a process waits for the others at a collective (multi-process; accelerate's "
                          "InitProcessGroupKwargs) before failing", default=1800)
    # validation
    validation_prompt: list[str] = _h("prompts for validation (several: repeat the flag's values or a YAML list)",
                                      default_factory=list)
    validation_image: list[str] = _h("condition images for validation (none: the first dataset conditions); with "
                                     "conditioning=canny, Canny is applied to them", default_factory=list)
    num_validation_images: int = _h("images per validation prompt", default=4)
    validation_steps: int = _h("validate every N optimizer steps (and at the end)", default=100)
    sampler: str = _h(f"validation sampler ({', '.join(sorted(SAMPLERS))})", default="dpmpp_2m")
    validation_inference_steps: int = _h("sampler steps for validation", default=20)
    validation_guidance_scale: float = _h("classifier-free guidance scale for validation", default=7.5)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {sorted(SAMPLERS)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; valid: {list(LR_SCHEDULERS)}")
        if not self.data_files and (self.train_data_dir is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of --train_data_dir (local folder), --dataset_name or --data_files")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (VAE factor), got {self.resolution}")
        for key in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                    "validation_steps", "num_validation_images", "validation_inference_steps", "logging_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if not self.validation_guidance_scale >= 0:
            raise ValueError(f"validation_guidance_scale must be >= 0 (1 disables guidance), got "
                             f"{self.validation_guidance_scale}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must lie in [0, 1], got {self.proportion_empty_prompts}")
        p, i = len(self.validation_prompt), len(self.validation_image)
        if p and i and p != i and 1 not in (p, i):
            raise ValueError(f"{p} validation prompts and {i} validation images: give one of either, or as many "
                             f"of both")
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}")
        check_run_args(self.output_dir, self.resolution, self.checkpoints_total_limit, self.ddp_timeout)
        check_optimizer_args({"learning_rate": self.learning_rate}, {"adam_epsilon": self.adam_epsilon},
                             {"max_grad_norm": self.max_grad_norm},
                             {"adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2},
                             {"adam_weight_decay": self.adam_weight_decay})


# ----------------------------------------------------------------------------------------------- pieces
def build_dataset(cfg: TrainControlNetConfig) -> ControlNetDataset:
    rows, root = build_rows(cfg.train_data_dir, cfg.dataset_name, cfg.dataset_config_name, cfg.cache_dir,
                            cfg.image_column, cfg.conditioning_image_column, cfg.caption_column, cfg.data_files)
    return ControlNetDataset(rows, cfg.resolution, root, cfg.conditioning, cfg.skip_bad_images,
                             cfg.canny_low_threshold, cfg.canny_high_threshold, cfg.max_train_samples)


def preflight(cfg: TrainControlNetConfig) -> None:
    """What can be checked before a model is loaded or a file written: local model dirs, a starting ControlNet that
    fits the base UNet, optional packages, validation images, a lower bound on memory (ValueError naming the flag)."""
    base = require_local_dir(cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path",
                             ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                              "scheduler/scheduler_config.json"))
    if cfg.controlnet_model_name_or_path:
        d = require_local_dir(cfg.controlnet_model_name_or_path, "--controlnet_model_name_or_path", ("config.json",))
        try:
            cn = ControlNetConfig.from_dict(json.loads((d / "config.json").read_text()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--controlnet_model_name_or_path: {d / 'config.json'} is not a ControlNet config "
                             f"({e})") from None
        bad = unet_mismatches(cn, json.loads((base / "unet" / "config.json").read_text()))
        if bad:
            raise ValueError(f"--controlnet_model_name_or_path {d} was built for another base model than {base} "
                             f"({'; '.join(bad)}); start from a ControlNet of this base, or leave the flag unset "
                             f"(a copy of the UNet encoder)")
    if cfg.use_8bit_adam:
        require_package("bitsandbytes", "--use_8bit_adam")
    missing = [p for p in cfg.validation_image if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--validation_image: {missing} not found")
    px = 3 * cfg.resolution ** 2 * 4  # one float32 image
    need = {"input batch": 2 * cfg.train_batch_size * px}
    if cfg.validation_prompt or cfg.validation_image:
        need["validation images"] = cfg.num_validation_images * px
        need["validation time grid"] = 3 * 8 * (cfg.validation_inference_steps + 1)
    check_memory(need, "lower --resolution, --train_batch_size, --num_validation_images or "
                       "--validation_inference_steps")


def denoising_loss(pipe: ControlNetPipeline, net, batch: dict, generator: torch.Generator,
                   proportion_empty_prompts: float = 0.0) -> torch.Tensor:
    """MSE between net's prediction and the scheduler's target kind on noised VAE latents of the batch.

    Draw order from `generator`: caption dropout, VAE posterior sample, noise, integer timesteps."""
    schedule, device, dtype = pipe.schedule, pipe.device, pipe.dtype
    texts = list(batch["text"])
    drop = torch.rand(len(texts), generator=generator) < proportion_empty_prompts
    texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
    x0 = pipe.encode_images(batch["pixel_values"].to(device), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, x0.dtype)
    n = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
    t = schedule.t_from_timestep(n).to(device)
    x_t = schedule.add_noise(x0, eps, t)
    ehs = pipe.encode_prompt(texts).to(dtype)
    cond = batch["conditioning_pixel_values"].to(device, dtype)
    pred = net(x_t, n.to(device), encoder_hidden_states=ehs, controlnet_cond=cond)
    return F.mse_loss(pred.float(), target(pipe.prediction, x0, eps, t, schedule).float())


def validation_pairs(cfg: TrainControlNetConfig, dataset: ControlNetDataset) -> list[tuple[str, np.ndarray]]:
    """(prompt, condition HxWx3 uint8) rows; conditions from --validation_image or the first dataset samples."""
    from .canny import canny

    prompts, images, r = list(cfg.validation_prompt), list(cfg.validation_image), cfg.resolution
    if not prompts and not images:
        return []
    if images:
        conds = [canny(load_rgb(p), cfg.canny_low_threshold, cfg.canny_high_threshold, size=(r, r))
                 if dataset.conditioning == "canny" else np.asarray(resize_center_crop(load_rgb(p), r))
                 for p in images]
    else:
        conds = [(dataset[k % len(dataset)]["conditioning_pixel_values"].permute(1, 2, 0).numpy() * 255)
                 .round().astype(np.uint8) for k in range(len(prompts))]
    n = max(len(prompts), len(conds))
    prompts = prompts * n if len(prompts) == 1 else prompts or [""] * n
    conds = conds * n if len(conds) == 1 else conds
    return list(zip(prompts, conds))


def log_validation(pipe: ControlNetPipeline, cfg: TrainControlNetConfig, pairs, step: int, out_dir: Path,
                   accelerator) -> Path:
    """Grid of rows (condition | num_validation_images samples): PNG in output_dir/validation + tracker image."""
    from PIL import Image

    rows = []
    for k, (prompt, cond) in enumerate(pairs):
        imgs = pipe(prompt, cond, num_images_per_prompt=cfg.num_validation_images, sampler=cfg.sampler,
                    steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                    height=cfg.resolution, width=cfg.resolution, seed=cfg.seed + 1000 * k, output_type="np")
        rows.append([cond] + [(im * 255).round().astype(np.uint8) for im in imgs])
    grid = image_grid(rows)
    path = out_dir / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")
    return path


def _multi_cpu() -> bool:
    """True for a multi-process launch without GPUs: accelerate then needs cpu=True to pick MULTI_CPU (gloo);
    otherwise (`accelerate launch --multi_gpu` on a CPU machine) every process would run alone as rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    try:
        from accelerate.utils import is_npu_available
        gpu = gpu or is_npu_available()
    except ImportError:
        pass
    return not gpu


def _optimizer(cfg: TrainControlNetConfig, params, lr: float):
    kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(params, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("--use_8bit_adam needs the optional bitsandbytes package (pip install bitsandbytes); "
                         "or leave use_8bit_adam off") from None
    return bnb.optim.AdamW8bit(params, **kw)


# ----------------------------------------------------------------------------------------------- training
@exclusive_output_dir  # one run per output_dir (diffusion.training.rundir)
def train(cfg: TrainControlNetConfig) -> dict:
    """Run (or resume) training; returns {"step", "losses" (this run), "checkpoint", "controlnet", "pipeline"}."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader

    from diffusion.training.data import EpochBatchSampler

    preflight(cfg)
    out_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=_multi_cpu(), mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / cfg.logging_dir)))
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up "
                           f"{accelerator.num_processes}; every process would act as the main one")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(out_dir)
    accelerator.wait_for_everyone()

    dataset = build_dataset(cfg)  # data errors (missing columns, bad captions) before any model is loaded
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    comps = load_or_explain("Stable Diffusion components", cfg.pretrained_model_name_or_path, lambda: load_components(
        cfg.pretrained_model_name_or_path, dtype=weight_dtype, device=accelerator.device))
    for name in ("unet", "vae", "text_encoder"):
        comps[name].requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    controlnet = (load_or_explain("starting ControlNet", cfg.controlnet_model_name_or_path,
                                  lambda: ControlNet.from_pretrained(cfg.controlnet_model_name_or_path))
                  if cfg.controlnet_model_name_or_path else ControlNet.from_unet(comps["unet"]))
    controlnet = controlnet.to(accelerator.device, torch.float32).train()
    pipe = ControlNetPipeline(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"],
                              comps["scheduler_config"], controlnet)
    if not isinstance(pipe.schedule, Discrete):
        name = comps["scheduler_config"].get("_class_name")
        raise ValueError(f"{cfg.pretrained_model_name_or_path}: scheduler {name} is not a DDPM-style (beta table) "
                         f"scheduler; ControlNet training here needs one")
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        comps["unet"].enable_gradient_checkpointing()

    if main and dataset.skipped:
        print(f"skipped {len(dataset.skipped)} unreadable samples, e.g. {dataset.skipped[0][1]}: "
              f"{dataset.skipped[0][2]}")
    batches = EpochBatchSampler(len(dataset), cfg.train_batch_size, cfg.seed, rank, world)
    # own generator: the loader's per-epoch seed draw must not advance the (checkpointed) global RNG
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.dataloader_num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.seed))
    ga = cfg.gradient_accumulation_steps
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(len(batches) / ga)

    lr = cfg.learning_rate * (ga * cfg.train_batch_size * world if cfg.scale_lr else 1)
    params = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params, lr)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    state_objects = {"lr_scheduler": lr_scheduler}  # not prepared: stepped once per optimizer step
    net = controlled_unet(comps["unet"], controlnet)

    run = start_run(accelerator, cfg, out_dir)  # checkpoint to resume (vetted: same run, readable, no pickle) or None
    step, ckpt = 0, run.checkpoint
    if ckpt is not None:
        step = int(load_checkpoint(accelerator, ckpt, state_objects, cfg.allow_pickle)["step"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {out_dir}; starting a new run")
    if main:  # only once model, data and checkpoint are known to fit: a failed start leaves the run dir as it was
        save_yaml(cfg, out_dir / "config.yaml")
    micro = step * ga  # data position and noise are functions of the micro-batch counter
    epoch, offset = divmod(micro, len(batches))

    if accelerator.trackers == [] and cfg.report_to != "none":
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in to_dict(cfg).items()}
        accelerator.init_trackers(cfg.tracker_project_name, config=hp)
    pairs = validation_pairs(cfg, dataset) if main else []
    metrics = open_metrics(out_dir / "metrics.jsonl", step) if main else None

    def save_controlnet(d: Path):
        accelerator.unwrap_model(controlnet).save_pretrained(d / "controlnet")

    def validate():
        if main and pairs:
            cn = accelerator.unwrap_model(controlnet)
            cn.eval()
            path = log_validation(pipe, cfg, pairs, step, out_dir, accelerator)
            cn.train()
            accelerator.print(f"step {step}: validation grid {path}")
        accelerator.wait_for_everyone()

    losses, acc = [], torch.zeros((), device=accelerator.device)
    guard = NonFiniteGuard(cfg.on_nonfinite)
    while step < max_steps:
        batches.set_epoch(epoch, offset)
        offset = 0
        for batch in loader:
            gen = step_generator(cfg.seed, micro, rank)
            sync = (micro + 1) % ga == 0
            with nullcontext() if sync or world == 1 else accelerator.no_sync(controlnet):
                # mixed precision: the prepared ControlNet autocasts itself; the frozen UNet runs in weight_dtype
                loss = denoising_loss(pipe, net, batch, gen, cfg.proportion_empty_prompts)
                accelerator.backward(loss / ga)
            acc += loss.detach() / ga
            micro += 1
            if not sync:
                continue
            clipped = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            loss_val = accelerator.reduce(acc, "mean").item()
            acc.zero_()
            # NaN/Inf: raise (stop) or drop the update (skip); fp16's GradScaler handles overflowing gradients itself
            norm = None if accelerator.scaler else float(clipped) if clipped is not None else grad_norm(params)
            ok = guard.check(step + 1, loss_val, norm, ckpt)
            if ok:
                optimizer.step()
                guard.check_weights(step + 1, params, ckpt)  # NaN/Inf weights from a finite update: stop
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=cfg.set_grads_to_none)
            step += 1
            losses.append(loss_val)
            if main:
                lr_now = lr_scheduler.get_last_lr()[0]
                metrics.write(json.dumps({"step": step, "loss": loss_val if ok else None, "lr": lr_now,
                                          **({} if ok else {"skipped": True})}) + "\n")
                metrics.flush()
                if step % cfg.logging_steps == 0 or step == max_steps:
                    accelerator.print(f"step {step}/{max_steps} loss {loss_val:.4f} lr {lr_now:.3g}")
            accelerator.log({"train/loss": loss_val, "train/lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if step % cfg.checkpointing_steps == 0 or step == max_steps:
                refuse_nonfinite(params, out_dir / f"checkpoint-{step:08d}", step)
                ckpt = save_checkpoint(accelerator, out_dir, step, {"micro_step": micro, "epoch": epoch},
                                       save_controlnet, cfg.checkpoints_total_limit, state_objects, run.identity)
            if step % cfg.validation_steps == 0 or step == max_steps:
                validate()
            if step >= max_steps:
                break
        epoch += 1

    final = accelerator.unwrap_model(controlnet)
    if main:
        metrics.close()
        refuse_nonfinite(final.parameters(), out_dir / "diffusion_pytorch_model.safetensors")
        save_into(out_dir, final.save_pretrained)  # weights, then config.json: each file old or new
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "losses": losses, "checkpoint": ckpt, "controlnet": final, "pipeline": pipe, "main": main,
            "checkpoints": [p for _, p in list_checkpoints(out_dir)]}
