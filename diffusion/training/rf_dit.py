"""Rectified-flow task (Esser et al. 2024) for DiT / MM-DiT / diffusers SD3Transformer2DModel on the shared loop.

Objective: diffusion.losses.DiffusionLoss (any schedule x prediction kind; default rectified flow + velocity +
logit-normal t). Checkpoints hold denoiser[_ema].safetensors with the resolved config in their metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from diffusion import get_schedule
from diffusion.losses import DiffusionLoss
from diffusion.models.dit import DIT_MODELS, build_dit
from diffusion.models.latents import sample_latents
from diffusion.models.mmdit import MMDIT_MODELS, build_mmdit
from diffusion.models.sd3_backbone import SD3Backbone

from .args import TrainingArgs
from .checkpoint import load_weights, resolve_checkpoint, save_weights
from .config import from_dict, option as _h, save_yaml, to_json
from .export import save_pretrained_atomic
from .grids import make_grid
from .guards import refuse_nonfinite
from .loop import Task, train as run_task
from .preflight import check_memory, load_or_explain, require_local_dir
from .rf_sampling import Conditioner, grid_conditions, make_schedule, sample_images

__all__ = ["TrainConfig", "RFDiTTask", "train", "load_trained", "sample_images", "make_grid", "make_schedule",
           "Conditioner", "model_spec", "build_model", "DiffusionLoss"]


@dataclass
class TrainConfig(TrainingArgs):
    """Rectified-flow (SD3) trainer for DiT / MM-DiT / diffusers SD3Transformer2DModel."""

    DEFAULTS = dict(output_dir="outputs/rf_dit", train_batch_size=64, max_train_steps=2000, learning_rate=3e-4,
                    lr_scheduler="constant_with_warmup", lr_warmup_steps=100, use_ema=True, ema_decay=0.999,
                    checkpoints_total_limit=3, tracker_project_name="train_rf_dit", sampler="flow_euler",
                    validation_guidance_scale=2.0)  # shared keys (TrainingArgs) with this trainer's defaults
    # data
    dataset: Literal["digits", "shapes", "folder"] = _h("digits (sklearn, class labels), shapes (captions), "
                                                        "folder (data_dir)", default="digits")
    data_dir: Optional[str] = _h("image folder for dataset=folder (optional metadata.jsonl)", default=None)
    resolution: int = _h("image size in pixels", default=16)
    channels: int = _h("image channels for dataset=folder (1 or 3)", default=3)
    num_shapes: int = _h("number of generated shape images for dataset=shapes", default=4000)
    vae: Optional[str] = _h("local diffusers AutoencoderKL dir: train on cached latents", default=None)
    latent_cache: Optional[str] = _h("latent cache file (default output_dir/latents.safetensors)", default=None)
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
    # validation grid
    samples_per_class: int = _h("grid rows (per class / prompt)", default=4)
    sample_seed: int = _h("seed of the grid's starting noise", default=0)

    def __post_init__(self):
        super().__post_init__()
        names = {"dit": DIT_MODELS, "mmdit": MMDIT_MODELS}.get(self.backbone)
        if names is not None and self.model not in names:
            raise ValueError(f"model {self.model!r} is not a {self.backbone} size; valid: {list(names)}")
        if self.backbone == "sd3" and not self.pretrained_transformer:
            raise ValueError("backbone=sd3 needs --pretrained_transformer DIR (a local SD3Transformer2DModel)")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset=folder needs --data_dir DIR")
        get_schedule(self.schedule)  # validates the name
        if self.shift != 1.0 and get_schedule(self.schedule).name != "rectified_flow":
            raise ValueError("shift applies to the rectified_flow schedule only; leave shift=1")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
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
    need = {"input batch": cfg.train_batch_size * c * px,
            "dataset in memory": {"digits": 1797, "shapes": cfg.num_shapes}.get(cfg.dataset, 0) * c * px,
            "sample grid": 10 * cfg.samples_per_class * c * px,
            "sample time grid": 3 * 8 * (cfg.validation_inference_steps + 1)}
    check_memory(need, "lower --resolution, --train_batch_size, --num_shapes, --samples_per_class or "
                       "--validation_inference_steps")


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
            ds = cache_latents(ds, codec, path, key=key, progress=cfg.progress_bar)
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


class RFDiTTask(Task):
    """Rectified-flow denoiser on class labels (DiT) or captions (MM-DiT, SD3) through the shared loop."""

    name = "train_rf_dit"

    def preflight(self):
        preflight(self.cfg)

    def build(self):
        cfg, acc = self.cfg, self.accelerator
        ds, self.codec, names, texts = build_dataset(cfg, acc)
        self.x_shape = tuple(ds[0]["x"].shape)
        has_labels = "label" in ds[0]
        num_classes = len(names) if (cfg.backbone == "dit" and has_labels and names) else 0
        te = None
        if cfg.backbone != "dit":
            te = build_text_encoder(cfg, texts, names)
            if acc.is_main_process and cfg.text_encoder == "tiny":
                save_pretrained_atomic(te, Path(cfg.output_dir) / "text_encoder")
        elif "text" in ds[0] and not has_labels:
            raise ValueError("dataset has captions but backbone=dit is class-conditional: use --backbone mmdit")
        self.spec = model_spec(cfg, self.x_shape, num_classes, (te.hidden_size, te.hidden_size) if te else None)
        torch.manual_seed(cfg.seed)
        model = load_or_explain("SD3 transformer", cfg.pretrained_transformer, lambda: build_model(self.spec)) \
            if cfg.backbone == "sd3" else build_model(self.spec)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.conditioner = Conditioner(cfg.backbone, num_classes, names, te, acc.device)
        self.loss_fn = DiffusionLoss(make_schedule(cfg), cfg.prediction, cfg.density, logit_mean=cfg.logit_mean,
                                     logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, weighting=cfg.weighting,
                                     min_snr_gamma=cfg.min_snr_gamma, time_input=cfg.time_input)
        self.grid_cond, self.nrow = grid_conditions(cfg, num_classes, names, texts)
        return ds, model

    def loss(self, model, batch, generator):
        cond = self.conditioner(batch, self.cfg.cond_dropout, generator)
        x0 = sample_latents(batch, generator).to(self.accelerator.device)  # VAE latents: a posterior sample
        return self.loss_fn(model, x0, generator=generator, **cond)

    def validate(self, model, step):
        g = self.grid_cond
        imgs = sample_images(model, self.cfg, self.conditioner, self.codec, self.x_shape, labels=g.get("labels"),
                             texts=g.get("texts"), seed=self.cfg.sample_seed, num=g.get("num", 1))
        return make_grid(imgs, self.nrow)

    def save_weights(self, directory, model, ema_model, step):
        meta = {"config": to_json(self.cfg), "model_spec": json.dumps(self.spec), "format": "diffusion.rf_dit",
                "step": str(step)}
        save_weights(model.state_dict(), directory / "denoiser.safetensors", meta)
        if ema_model is not None:
            save_weights(ema_model.state_dict(), directory / "denoiser_ema.safetensors", meta)
        save_yaml(self.cfg, directory / "config.yaml")

    def export(self, model, ema_model):
        """Final and EMA weights as save_pretrained directories output_dir/transformer[_ema]: one from_pretrained
        call each (DiT, MMDiT, or diffusers' SD3Transformer2DModel; diffusion.models.load_pretrained for any)."""
        for name, net in (("transformer", model), ("transformer_ema", ema_model)):
            if net is not None:
                out = Path(self.cfg.output_dir) / name
                refuse_nonfinite(net.parameters(), out)
                save_pretrained_atomic(net.transformer if self.cfg.backbone == "sd3" else net, out)
        return {}


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {"step", "losses" (this run), "checkpoint", "model", "ema", ...}."""
    return run_task(RFDiTTask(cfg))


# ----------------------------------------------------------------------------------------------- loading
def load_trained(path, ema: bool = True, device="cpu"):
    """Rebuild a trained network from a checkpoint dir (or run dir: its newest checkpoint) or a
    denoiser[_ema].safetensors file -> (net, cfg, extras {conditioner, codec, names, texts, x_shape})."""
    path = Path(path)
    if path.is_dir() and not (path / "denoiser.safetensors").is_file():
        old_layout = path / "checkpoints"  # runs written before the one layout output_dir/checkpoint-N
        path = resolve_checkpoint("latest", old_layout if old_layout.is_dir() else path)
        if path is None:
            raise ValueError("no complete checkpoint found")
    if path.is_dir():
        path = path / ("denoiser_ema.safetensors" if ema and (path / "denoiser_ema.safetensors").is_file()
                       else "denoiser.safetensors")
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
