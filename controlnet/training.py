"""ControlNet training on a frozen Stable-Diffusion-layout model (Zhang, Rao & Agrawala 2023), on accelerate.

Only the ControlNet learns; UNet, VAE and text encoder are frozen (requires_grad False, eval, no graph for the
encoders). Noise schedule and prediction kind come from the pipeline's scheduler config (diffusion core):
integer timesteps n ~ U{0..N-1} as in diffusers, t = schedule.t_from_timestep(n), x_t = schedule.add_noise.
Gradient accumulation is counted in micro-batches: the data position and all noise are functions of the
micro-batch counter (diffusion.training.checkpoint.step_generator), so a resumed run continues exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from diffusion import Discrete, target
from diffusion.images import image_grid, read_image, to_uint8
from diffusion.training.args import TrainingArgs
from diffusion.training.config import option as _h
from diffusion.training.export import save_into, save_pretrained_atomic
from diffusion.training.guards import refuse_nonfinite
from diffusion.training.loop import Task, train as run_task
from diffusion.training.preflight import check_memory, load_or_explain, require_local_dir, require_package

from .config import ControlNetConfig, hint_widths, unet_mismatches
from .data import CONDITIONING_MODES, ControlNetDataset, build_rows, collate, resize_center_crop
from .model import ControlNet
from .pipeline import ControlNetPipeline, controlled_unet, load_components


@dataclass(kw_only=True)  # keyword-only: the required pretrained_model_name_or_path may follow the shared defaults
class TrainControlNetConfig(TrainingArgs):
    """Train a ControlNet on a frozen local Stable Diffusion pipeline directory (argument names as in the diffusers
    train_controlnet.py example)."""

    pretrained_model_name_or_path: str = _h("local diffusers-format SD pipeline dir (unet/ vae/ text_encoder/ "
                                            "tokenizer/ scheduler/)")
    controlnet_model_name_or_path: Optional[str] = _h("ControlNet dir to start from (default: copy of the UNet "
                                                      "encoder, zero convolutions)", default=None)
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
    # SDXL only (diffusers' train_controlnet_sdxl.py)
    pretrained_vae_model_name_or_path: Optional[str] = _h(
        "(SDXL only) local AutoencoderKL dir (config.json + weights) used instead of the base's vae/, e.g. an "
        "fp16-safe SDXL VAE; it runs in the mixed-precision dtype, the base's own VAE in float32", default=None)
    crops_coords_top_left_h: int = _h("(SDXL only) crop top coordinate in the micro-conditioning add_time_ids",
                                      default=0)
    crops_coords_top_left_w: int = _h("(SDXL only) crop left coordinate in the micro-conditioning add_time_ids",
                                      default=0)
    # SD3 only (diffusers' train_controlnet_sd3.py; controlnet.training_sd3)
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = _h(
        "(SD3 only) timestep density / loss weight: logit_normal, mode (densities); cosmap, sigma_sqrt (uniform t, "
        "weight 2/(pi(1-2s+2s^2)) or s^-2); none (uniform t, weight 1)", default="logit_normal")
    logit_mean: float = _h("(SD3 only) logit_normal mean (diffusers' sign: positive = less noise)", default=0.0)
    logit_std: float = _h("(SD3 only) logit_normal standard deviation", default=1.0)
    mode_scale: float = _h("(SD3 only) scale of the mode density", default=1.29)
    precondition_outputs: int = _h("(SD3 only) 1: regress x0 = x_t - sigma v on the data (EDM-style, diffusers' "
                                   "default), 0: regress the velocity eps - x0", default=1)
    num_extra_conditioning_channels: int = _h("(SD3 only) extra condition channels of a new ControlNet (only 0: "
                                              "conditions are VAE latents)", default=0)
    controlnet_num_layers: Optional[int] = _h("(SD3 only, not a diffusers flag) transformer blocks a new ControlNet "
                                              "copies (default min(12, base blocks // 2))", default=None)
    max_sequence_length: int = _h("(SD3 only) T5 tokens of the prompt", default=77)
    upcast_vae: bool = _h("(SD3 only) keep the VAE in float32 under mixed precision", default=False)
    DEFAULTS = dict(output_dir="controlnet-model", train_batch_size=4, learning_rate=5e-6, lr_warmup_steps=500,
                    adam_weight_decay=1e-2, set_grads_to_none=False, tracker_project_name="train_controlnet",
                    validation_steps=100, validation_guidance_scale=7.5)  # diffusers' train_controlnet.py defaults
    # validation
    validation_prompt: list[str] = _h("prompts for validation (several: repeat the flag's values or a YAML list)",
                                      default_factory=list)
    validation_image: list[str] = _h("condition images for validation (none: the first dataset conditions); with "
                                     "conditioning=canny, Canny is applied to them", default_factory=list)
    num_validation_images: int = _h("images per validation prompt", default=4)

    def __post_init__(self):
        super().__post_init__()
        if not self.data_files and (self.train_data_dir is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of --train_data_dir (local folder), --dataset_name or --data_files")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (VAE factor), got {self.resolution}")
        if self.num_validation_images < 1:
            raise ValueError(f"num_validation_images must be >= 1, got {self.num_validation_images}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must lie in [0, 1], got {self.proportion_empty_prompts}")
        p, i = len(self.validation_prompt), len(self.validation_image)
        if p and i and p != i and 1 not in (p, i):
            raise ValueError(f"{p} validation prompts and {i} validation images: give one of either, or as many "
                             f"of both")
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}")
        for key in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (pixels), got {getattr(self, key)}")


# ----------------------------------------------------------------------------------------------- pieces
def build_dataset(cfg: TrainControlNetConfig) -> ControlNetDataset:
    rows, root = build_rows(cfg.train_data_dir, cfg.dataset_name, cfg.dataset_config_name, cfg.cache_dir,
                            cfg.image_column, cfg.conditioning_image_column, cfg.caption_column, cfg.data_files)
    return ControlNetDataset(rows, cfg.resolution, root, cfg.conditioning, cfg.skip_bad_images,
                             cfg.canny_low_threshold, cfg.canny_high_threshold, cfg.max_train_samples)


SD_LAYOUT = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
             "scheduler/scheduler_config.json")
SDXL_ONLY = {"pretrained_vae_model_name_or_path": None, "crops_coords_top_left_h": 0, "crops_coords_top_left_w": 0}
SD3_ONLY = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
            "precondition_outputs": 1, "num_extra_conditioning_channels": 0, "controlnet_num_layers": None,
            "max_sequence_length": 77, "upcast_vae": False}


def preflight(cfg: TrainControlNetConfig, layout=SD_LAYOUT, family: str = "sd") -> Path:
    """What can be checked before a model is loaded or a file written: local model dirs holding `layout`, a starting
    ControlNet that fits the base UNet, optional packages, validation images, a lower bound on memory (ValueError
    naming the flag). Returns the base model directory."""
    given = [k for k, unset in SDXL_ONLY.items() if getattr(cfg, k) != unset]
    if family != "sdxl" and given:
        raise ValueError(f"--{', --'.join(given)}: SDXL only, but {cfg.pretrained_model_name_or_path} is a "
                         f"{family.upper()} pipeline; drop the flag(s) or pass an SDXL base")
    given = [k for k, unset in SD3_ONLY.items() if getattr(cfg, k) != unset]
    if given:  # this preflight serves SD and SDXL; SD3 has controlnet.training_sd3.preflight_sd3
        raise ValueError(f"--{', --'.join(given)}: SD3 only, but {cfg.pretrained_model_name_or_path} is a "
                         f"{family.upper()} pipeline; drop the flag(s) or pass an SD3 base")
    base = require_local_dir(cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path", layout)
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
    else:  # a new ControlNet: its condition encoder must downsample as the VAE does
        from .preflight import read_json

        hint_widths(vae_factor(read_json(base / "vae" / "config.json", "pass a diffusers VAE config")))
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
    return base


def vae_factor(vae) -> int:
    """Spatial downsampling of a VAE (module or config dict): 2^(number of blocks - 1)."""
    cfg = vae if isinstance(vae, dict) else vae.config
    return 2 ** (len(cfg.get("block_out_channels", (64,))) - 1)  # (diffusers' AutoencoderKL default)


def text_inputs(pipe: ControlNetPipeline, texts: list[str]) -> dict:
    """The network's text inputs for captions (SD: encoder_hidden_states, the CLIP last hidden states)."""
    return {"encoder_hidden_states": pipe.encode_prompt(texts).to(pipe.dtype)}


def denoising_loss(pipe: ControlNetPipeline, net, batch: dict, generator: torch.Generator,
                   proportion_empty_prompts: float = 0.0, encode_text=text_inputs) -> torch.Tensor:
    """MSE between net's prediction and the scheduler's target kind on noised VAE latents of the batch;
    `encode_text(pipe, captions)` gives the text inputs (the family's: SDXL adds pooled embeds and time ids).

    Draw order from `generator`: caption dropout, VAE posterior sample, noise, integer timesteps."""
    schedule, device, dtype = pipe.schedule, pipe.device, pipe.dtype
    texts = list(batch["text"])
    drop = torch.rand(len(texts), generator=generator) < proportion_empty_prompts
    texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
    x0 = pipe.encode_images(batch["pixel_values"].to(device), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, x0.dtype)
    n = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
    t = schedule.t_from_timestep(n).to(device)
    x_t = schedule.add_noise(x0, eps, t).to(dtype)  # (SDXL: float32 VAE latents, the UNet's dtype in)
    cond = batch["conditioning_pixel_values"].to(device, dtype)
    pred = net(x_t, n.to(device), controlnet_cond=cond, **encode_text(pipe, texts))
    # the target from the (bf16 under mixed precision) latents and noise, formed in float32, not rounded back
    return F.mse_loss(pred.float(), target(pipe.prediction, x0.float(), eps.float(), t, schedule))


def validation_pairs(cfg: TrainControlNetConfig, dataset: ControlNetDataset) -> list[tuple[str, np.ndarray]]:
    """(prompt, condition HxWx3 uint8) rows; conditions from --validation_image or the first dataset samples."""
    from .canny import canny

    prompts, images, r = list(cfg.validation_prompt), list(cfg.validation_image), cfg.resolution
    if not prompts and not images:
        return []
    if images:
        conds = [canny(read_image(p), cfg.canny_low_threshold, cfg.canny_high_threshold, size=(r, r))
                 if dataset.conditioning == "canny" else np.asarray(resize_center_crop(read_image(p), r))
                 for p in images]
    else:
        conds = [to_uint8(dataset[k % len(dataset)]["conditioning_pixel_values"].permute(1, 2, 0))
                 for k in range(len(prompts))]
    n = max(len(prompts), len(conds))
    prompts = prompts * n if len(prompts) == 1 else prompts or [""] * n
    conds = conds * n if len(conds) == 1 else conds
    return list(zip(prompts, conds))


def validation_grid(pipe: ControlNetPipeline, cfg: TrainControlNetConfig, pairs) -> np.ndarray:
    """Rows of (condition | num_validation_images samples), one per (prompt, condition) pair."""
    rows = []
    for k, (prompt, cond) in enumerate(pairs):
        imgs = pipe(prompt, cond, num_images_per_prompt=cfg.num_validation_images, sampler=cfg.sampler,
                    steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                    height=cfg.resolution, width=cfg.resolution, seed=cfg.seed + 1000 * k, output_type="np").images
        rows.append([cond, *to_uint8(imgs)])
    return image_grid(rows)


# ----------------------------------------------------------------------------------------------- task
class ControlNetTask(Task):
    """Only the ControlNet learns; UNet, VAE and text encoder are frozen (in the mixed-precision dtype)."""

    name = "train_controlnet"
    build_writes = False  # loads the frozen pipeline and the ControlNet only
    collate_fn = staticmethod(collate)
    # family hooks (controlnet.training_sdxl overrides them): what is frozen, loaded, built and fed as text
    frozen = ("unet", "vae", "text_encoder")
    encode_text = staticmethod(text_inputs)

    def preflight(self):
        preflight(self.cfg)

    def load_frozen(self, weight_dtype: torch.dtype) -> dict:
        """The base pipeline's components (and scheduler_config) in the mixed-precision dtype."""
        path = self.cfg.pretrained_model_name_or_path
        return load_or_explain("Stable Diffusion components", path,
                               lambda: load_components(path, dtype=weight_dtype, device=self.accelerator.device))

    def make_pipeline(self, comps: dict, controlnet: ControlNet) -> ControlNetPipeline:
        return ControlNetPipeline(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"],
                                  comps["scheduler_config"], controlnet)

    def build(self):
        cfg, acc = self.cfg, self.accelerator
        dataset = build_dataset(cfg)  # data errors (missing columns, bad captions) before any model is loaded
        weight_dtype = cfg.weight_dtype
        comps = self.load_frozen(weight_dtype)
        for name in self.frozen:
            comps[name].requires_grad_(False).eval()
        torch.manual_seed(cfg.seed)
        controlnet = (load_or_explain("starting ControlNet", cfg.controlnet_model_name_or_path,
                                      lambda: ControlNet.from_pretrained(cfg.controlnet_model_name_or_path))
                      if cfg.controlnet_model_name_or_path else ControlNet.from_unet(
                          comps["unet"], conditioning_embedding_out_channels=hint_widths(vae_factor(comps["vae"]))))
        controlnet = controlnet.to(acc.device, torch.float32).train()
        self.pipe = self.make_pipeline(comps, controlnet)
        if not isinstance(self.pipe.schedule, Discrete):
            name = comps["scheduler_config"].get("_class_name")
            raise ValueError(f"{cfg.pretrained_model_name_or_path}: scheduler {name} is not a DDPM-style (beta table) "
                             f"scheduler; ControlNet training here needs one")
        if cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            comps["unet"].enable_gradient_checkpointing()
        if acc.is_main_process and dataset.skipped:
            acc.print(f"skipped {len(dataset.skipped)} unreadable samples, e.g. {dataset.skipped[0][1]}: "
                      f"{dataset.skipped[0][2]}")
        self.unet, self.net, self.net_of = comps["unet"], None, None
        self.pairs = validation_pairs(cfg, dataset) if acc.is_main_process else []
        return dataset, controlnet

    def loss(self, model, batch, generator):
        if self.net is None or self.net_of is not model:  # the prepared ControlNet (autocasts itself)
            self.net, self.net_of = controlled_unet(self.unet, model), model
        return denoising_loss(self.pipe, self.net, batch, generator, self.cfg.proportion_empty_prompts,
                              self.encode_text)

    def validate(self, model, step):
        if not self.pairs:
            return None
        trained, self.pipe.controlnet = self.pipe.controlnet, model  # the net handed over: the EMA with --use_ema
        try:
            return validation_grid(self.pipe, self.cfg, self.pairs)
        finally:
            self.pipe.controlnet = trained

    def save_weights(self, directory, model, ema_model, step):
        model.save_pretrained(directory / "controlnet")
        if ema_model is not None:  # --use_ema
            ema_model.save_pretrained(directory / "controlnet_ema")

    def export(self, model, ema_model):
        """Final weights into output_dir itself, the EMA (--use_ema) into output_dir/controlnet_ema: one
        ControlNet.from_pretrained call each, diffusers' ControlNetModel directories."""
        out = Path(self.cfg.output_dir)
        refuse_nonfinite(model.parameters(), out / "diffusion_pytorch_model.safetensors")
        save_into(out, model.save_pretrained)  # weights, then config.json: each old or new
        if ema_model is not None:
            refuse_nonfinite(ema_model.parameters(), out / "controlnet_ema")
            save_pretrained_atomic(ema_model, out / "controlnet_ema")
        return {"controlnet": model, "pipeline": self.pipe}


def task_for(cfg: TrainControlNetConfig) -> Task:
    """The task of the base model's family (controlnet.families.pipeline_family: model_index.json, or the folders)."""
    from .families import pipeline_family

    base = Path(cfg.pretrained_model_name_or_path)
    for d in (base, base / "transformer_ema", base / "transformer"):  # our DiT / MM-DiT (or an rf_dit run dir)
        try:
            cls = json.loads((d / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue  # missing or unreadable: the family's preflight names the problem
        if cls in ("DiT", "MMDiT"):
            raise ValueError(f"--pretrained_model_name_or_path {d} holds a {cls} (diffusion.models), not a Stable "
                             f"Diffusion pipeline: train its ControlNet with scripts/train_dit_controlnet.py")
    family = pipeline_family(base)
    if family == "sdxl":
        from .training_sdxl import SDXLControlNetTask
        return SDXLControlNetTask(cfg)
    if family == "sd3":
        from .training_sd3 import SD3ControlNetTask
        return SD3ControlNetTask(cfg)
    return ControlNetTask(cfg)


def train(cfg: TrainControlNetConfig) -> dict:
    """Run (or resume) training; returns {"step", "losses" (this run), "checkpoint", "controlnet", "pipeline", ...}."""
    return run_task(task_for(cfg))
