"""ControlNet training on a frozen DiT / MM-DiT (diffusion.models) with the rectified-flow loss (Zhang et al. 2023;
Esser et al. 2024), on the one loop (diffusion.training.loop).

The base is a transformer written by scripts/train_rf_dit.py (output_dir/transformer[_ema]); only a
DiTControlNet.from_transformer copy learns. Loss: diffusion.losses.DiffusionLoss with the base's objective (default
rectified flow, velocity, logit-normal t, 1000 t); text / labels through rf_dit's Conditioner (caption dropout =
--proportion_empty_prompts); (image, condition, caption) rows from controlnet.data, in pixel space. Checkpoints and
exports as the ControlNet trainer: checkpoint-N/controlnet[_ema]/, final weights in output_dir, EMA in
output_dir/controlnet_ema (one DiTControlNet.from_pretrained each).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch

from diffusion.images import image_grid, to_uint8
from diffusion.losses import DiffusionLoss
from diffusion.models.mmdit import MMDiT
from diffusion.models.pretrained import load_pretrained
from diffusion.training.config import option as _h
from diffusion.training.loop import train as run_task
from diffusion.training.preflight import load_or_explain, require_local_dir
from diffusion.training.rf_sampling import Conditioner, make_schedule, sample_images

from .dit_controlnet import ControlledTransformer, DiTControlNet, map_residuals
from .training import SD3_ONLY, SDXL_ONLY, ControlNetTask, TrainControlNetConfig, build_dataset, validation_pairs

OBJECTIVE = ("schedule", "prediction", "time_input", "shift")  # must equal the base run's (its config.yaml)


@dataclass(kw_only=True)
class TrainDiTControlNetConfig(TrainControlNetConfig):
    """Train a DiTControlNet on a frozen DiT / MM-DiT from scripts/train_rf_dit.py (diffusers' ControlNet flags)."""

    pretrained_model_name_or_path: str = _h("the trained transformer: a DiT / MMDiT save_pretrained dir "
                                            "(<rf_dit run>/transformer_ema) or a train_rf_dit.py output_dir")
    text_encoder: Optional[str] = _h("MM-DiT: local text encoder dir (default: the run's text_encoder/)", default=None)
    controlnet_num_layers: Optional[int] = _h("transformer blocks a new ControlNet copies (default: depth // 2, at "
                                              "least 1)", default=None)
    residual_mapping: Literal["interval", "first"] = _h("ControlNet residuals -> base blocks: interval (diffusers SD3) "
                                                        "or first (controlnet.dit_controlnet.map_residuals)",
                                                        default="interval")
    resolution: int = _h("training resolution in pixels (the base's; shipped rf_dit configs: 16)", default=16)
    # objective: the base run's, in train_rf_dit's terms (t = 1 is noise); checked against its config.yaml
    schedule: str = _h("noise schedule of the base (diffusion.get_schedule)", default="rectified_flow")
    prediction: Literal["velocity", "eps", "v", "x0"] = _h("the base's output kind", default="velocity")
    time_input: Literal["t1000", "t", "timestep", "log_snr", "auto"] = _h("the base's time signal", default="t1000")
    shift: float = _h("SD3 time shift (training and sampling)", default=1.0)
    sample_shift: Optional[float] = _h("shift for sampling only (default: shift)", default=None)
    density: Literal["uniform", "logit_normal", "mode", "cosmap"] = _h("timestep density (train_rf_dit's)",
                                                                       default="logit_normal")
    logit_mean: float = _h("logit-normal location m, t = sigmoid(m + s N(0, 1)): positive = more noise (as "
                           "train_rf_dit; diffusers' SD3 sign is the opposite)", default=0.0)
    logit_std: float = _h("logit-normal scale s", default=1.0)
    mode_scale: float = _h("scale s of the mode density (SD3 eq. 20)", default=1.29)
    DEFAULTS = dict(output_dir="dit-controlnet-model", train_batch_size=16, learning_rate=1e-4, lr_warmup_steps=0,
                    tracker_project_name="train_dit_controlnet", sampler="flow_euler", validation_guidance_scale=2.0)

    def __post_init__(self):
        super().__post_init__()
        if self.controlnet_num_layers is not None and self.controlnet_num_layers < 1:
            raise ValueError(f"controlnet_num_layers must be >= 1, got {self.controlnet_num_layers}")
        own = ("logit_mean", "logit_std", "mode_scale", "controlnet_num_layers")  # re-declared above, our meaning
        given = [k for k, unset in {**SDXL_ONLY, **SD3_ONLY}.items() if k not in own and getattr(self, k) != unset]
        if given:
            raise ValueError(f"--{', --'.join(given)}: SDXL / SD3 pipelines only; drop the flag(s) for a DiT / MM-DiT")


def transformer_dir(path) -> Path:
    """--pretrained_model_name_or_path itself, or a run dir's transformer_ema/ (else transformer/)."""
    d = require_local_dir(path, "--pretrained_model_name_or_path")
    found = [d / sub for sub in ("", "transformer_ema", "transformer") if (d / sub / "config.json").is_file()]
    if not found:
        raise ValueError(f"--pretrained_model_name_or_path {d} holds no config.json, transformer_ema/ or transformer/: "
                         f"pass a DiT / MMDiT save_pretrained dir or a scripts/train_rf_dit.py output_dir")
    cls = json.loads((found[0] / "config.json").read_text()).get("_class_name")
    if cls not in ("DiT", "MMDiT"):
        raise ValueError(f"--pretrained_model_name_or_path {found[0]} holds a {cls}, not a DiT / MMDiT "
                         f"(diffusion.models); Stable Diffusion pipelines train with scripts/train_controlnet.py")
    return found[0]


def preflight(cfg: TrainDiTControlNetConfig) -> Path:
    """Local dirs, the base's kind and objective, validation images: before anything loads (ValueError naming
    the flag)."""
    import yaml

    d = transformer_dir(cfg.pretrained_model_name_or_path)
    run_cfg = d.parent / "config.yaml"  # the rf_dit run's resolved config
    run = yaml.safe_load(run_cfg.read_text()) if run_cfg.is_file() else {}
    bad = [f"--{k} {run[k]}" for k in OBJECTIVE if k in run and run[k] != getattr(cfg, k)]
    if bad:
        raise ValueError(f"the base was trained with {', '.join(bad)} ({run_cfg}); pass the same")
    if json.loads((d / "config.json").read_text())["_class_name"] == "MMDiT":
        require_local_dir(cfg.text_encoder or d.parent / "text_encoder", "--text_encoder", ("config.json",))
    if cfg.controlnet_model_name_or_path:
        require_local_dir(cfg.controlnet_model_name_or_path, "--controlnet_model_name_or_path", ("config.json",))
    missing = [p for p in cfg.validation_image if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--validation_image: {missing} not found")
    return d


class DiTControlNetTask(ControlNetTask):
    """Only the DiTControlNet learns; the transformer (and text encoder) are frozen. Checkpoints / exports: the
    ControlNet trainer's (ControlNetTask.save_weights / export)."""

    name = "train_dit_controlnet"

    def preflight(self):
        preflight(self.cfg)

    def build(self):
        cfg, acc = self.cfg, self.accelerator
        dataset = build_dataset(cfg)
        d = transformer_dir(cfg.pretrained_model_name_or_path)
        transformer = load_or_explain("transformer", d, lambda: load_pretrained(d)).to(acc.device).float()
        arch = "mmdit" if isinstance(transformer, MMDiT) else "dit"
        c = transformer.in_channels
        if c not in (1, 3):
            raise ValueError(f"{d} takes {c} input channels (a latent-space model); this trainer works in pixel "
                             f"space (1 or 3 channels): train the base on pixels")
        self.x_shape = (c, cfg.resolution, cfg.resolution)
        te, self.num_classes = None, getattr(transformer, "num_classes", 0)
        if arch == "mmdit":
            from diffusion.models.text_encoder import TextEncoder

            te_dir = cfg.text_encoder or d.parent / "text_encoder"
            te = load_or_explain("text encoder", te_dir, lambda: TextEncoder.from_pretrained(te_dir))
            want = (transformer.context_embedder.in_features, transformer.pooled_embedder[0].in_features)
            if (te.hidden_size, te.hidden_size) != want:
                raise ValueError(f"--text_encoder {te_dir}: hidden size {te.hidden_size} does not fit the MM-DiT's "
                                 f"(joint_attention_dim, pooled_projection_dim) = {want}")
        self.conditioner = Conditioner(arch, self.num_classes, None, te, acc.device)
        torch.manual_seed(cfg.seed)
        if cfg.controlnet_model_name_or_path:
            p = cfg.controlnet_model_name_or_path
            controlnet = load_or_explain("starting DiTControlNet", p, lambda: DiTControlNet.from_pretrained(p))
        else:
            controlnet = DiTControlNet.from_transformer(
                transformer, cfg.controlnet_num_layers or max(1, len(transformer.blocks) // 2), conditioning_channels=3)
        if arch == "dit" and controlnet.y_embedder is not None:  # label dropout is the Conditioner's (CFG)
            controlnet.y_embedder.dropout_prob = 0.0
            controlnet.register_to_config(class_dropout_prob=0.0)
        controlnet = controlnet.to(acc.device, torch.float32).train()
        # checks the fit (ValueError naming the mismatch), freezes the transformer; the net validation samples
        self.controlled = ControlledTransformer(transformer, controlnet, residual_mapping=cfg.residual_mapping)
        if cfg.gradient_checkpointing:
            self.controlled.enable_gradient_checkpointing()
        self.loss_fn = DiffusionLoss(make_schedule(cfg), cfg.prediction, cfg.density, logit_mean=cfg.logit_mean,
                                     logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                     time_input=cfg.time_input)
        self.pairs = validation_pairs(cfg, dataset) if acc.is_main_process else []
        return dataset, controlnet

    def labels(self, texts) -> Optional[torch.Tensor]:
        """DiT: captions are class indices ('' = the null class); None for a text model or an unconditional DiT."""
        if self.conditioner.te is not None or not self.num_classes:
            return None
        bad = [t for t in texts if t.strip() and not (t.strip().isdigit() and int(t) < self.num_classes)]
        if bad:
            raise ValueError(f"a class-conditional DiT base takes captions that are class indices 0..."
                             f"{self.num_classes - 1} (or '' for the null class); got {bad[:3]}")
        return torch.tensor([int(t) if t.strip() else self.num_classes for t in texts])

    def controlled_call(self, controlnet, x, t, controlnet_cond, **cond):
        """The base with the residuals of `controlnet` (the prepared, possibly DDP-wrapped, trainable module)."""
        c = self.controlled
        res = map_residuals(controlnet(x, t, controlnet_cond, **cond), len(c.transformer.blocks), c.residual_mapping,
                            c.skip_blocks)
        with self.accelerator.autocast():
            return c.transformer(x, t, block_residuals=res, **cond)

    def loss(self, model, batch, generator):
        x0 = batch["pixel_values"].to(self.accelerator.device)  # (B,3,R,R) in [-1, 1]
        x0 = x0.mean(1, keepdim=True) if self.x_shape[0] == 1 else x0
        labels = self.labels(batch["text"])
        inputs = {"x": x0, "text": batch["text"], **({} if labels is None else {"label": labels})}
        cond = self.conditioner(inputs, self.cfg.proportion_empty_prompts, generator)  # caption dropout: CFG
        hint = batch["conditioning_pixel_values"].to(x0.device)  # (B,3,R,R) in [0, 1]
        return self.loss_fn(partial(self.controlled_call, model), x0, generator=generator, controlnet_cond=hint, **cond)

    def sample(self, controlnet, texts, hints, seed: int = 0, **kw) -> torch.Tensor:
        """Images in [-1, 1] (B,C,R,R) for captions and conditions (B,3,R,R) in [0, 1], through diffusion.sample."""
        trained, self.controlled.controlnets[0] = self.controlled.controlnets[0], controlnet
        try:
            labels = self.labels(texts)
            return sample_images(self.controlled, self.cfg, self.conditioner, None, self.x_shape, seed=seed,
                                 texts=None if labels is not None else list(texts), labels=labels,
                                 extra_cond={"controlnet_cond": hints}, **kw)
        finally:
            self.controlled.controlnets[0] = trained

    def validate(self, model, step):
        """Rows of (condition | num_validation_images samples), one per (prompt, condition) pair."""
        rows, n = [], self.cfg.num_validation_images
        for k, (prompt, cond) in enumerate(self.pairs):
            hint = torch.from_numpy(cond).permute(2, 0, 1).float().div(255)[None].repeat(n, 1, 1, 1)
            imgs = self.sample(model, [prompt] * n, hint, seed=self.cfg.seed + 1000 * k)
            rows.append([cond, *to_uint8((imgs.expand(-1, 3, -1, -1).permute(0, 2, 3, 1) + 1) / 2)])
        return image_grid(rows) if rows else None

    def export(self, model, ema_model):
        self.pipe = self.controlled  # the frozen transformer steered by the trained ControlNet
        return super().export(model, ema_model)


def train(cfg: TrainDiTControlNetConfig) -> dict:
    """Run (or resume) training -> {"step", "losses" (this run), "checkpoint", "controlnet", "pipeline", ...}."""
    return run_task(DiTControlNetTask(cfg))
