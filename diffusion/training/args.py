"""The flags every trainer shares, named as in diffusers' example training scripts (train_controlnet.py,
train_text_to_image.py). Each trainer's config is a dataclass that extends TrainingArgs with its model, data
and validation keys, and may re-declare a shared key to change its default (never its meaning)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from diffusion import SAMPLERS

from .config import option as _h
from .guards import check_optimizer_args
from .preflight import check_run_args

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "all", "none")

# names the trainers used before they shared one vocabulary -> the diffusers name (a did-you-mean on use)
RENAMED = {
    "max_steps": "max_train_steps", "batch_size": "train_batch_size", "log_every": "logging_steps",
    "sample_every": "validation_steps", "validation_every": "validation_steps", "tensorboard": "report_to",
    "num_workers": "dataloader_num_workers", "adam_eps": "adam_epsilon", "weight_decay": "adam_weight_decay",
    "adam_betas": "adam_beta1 and adam_beta2", "checkpoint_every": "checkpointing_steps",
    "progress": "progress_bar", "sample_steps": "validation_inference_steps", "cfg_scale": "validation_guidance_scale",
    "guidance_scale": "validation_guidance_scale", "validation_prompts": "validation_prompt",
}


@dataclass
class TrainingArgs:
    """Shared training flags (diffusers' example names)."""

    RENAMED = RENAMED  # class attribute (no annotation): read by diffusion.training.config for did-you-mean errors
    DEFAULTS = {}  # a trainer's own defaults of shared keys, {name: value}; help and choices stay the shared ones

    output_dir: str = _h("run directory: config.yaml, metrics.jsonl, logs/, validation/, checkpoint-N/, exports",
                         default="outputs/run")
    seed: int = _h("seed for init, data order, noise and validation", default=0)
    # optimisation
    train_batch_size: int = _h("micro-batch size per process", default=16)
    gradient_accumulation_steps: int = _h("micro-batches per optimizer step", default=1)
    num_train_epochs: int = _h("epochs (ignored when max_train_steps is set)", default=1)
    max_train_steps: Optional[int] = _h("optimizer steps (overrides num_train_epochs)", default=None)
    learning_rate: float = _h("AdamW learning rate (after warmup)", default=1e-4)
    scale_lr: bool = _h("multiply learning_rate by accumulation x batch size x processes", default=False)
    lr_scheduler: str = field(default="constant", metadata={
        "help": "learning-rate schedule (diffusers.optimization.get_scheduler)", "choices": LR_SCHEDULERS})
    lr_warmup_steps: int = _h("linear warmup steps of the learning-rate schedule", default=0)
    lr_num_cycles: int = _h("cycles of cosine_with_restarts", default=1)
    lr_power: float = _h("power of the polynomial schedule", default=1.0)
    use_8bit_adam: bool = _h("bitsandbytes 8-bit AdamW (optional dependency)", default=False)
    adam_beta1: float = _h("AdamW beta1", default=0.9)
    adam_beta2: float = _h("AdamW beta2", default=0.999)
    adam_weight_decay: float = _h("AdamW weight decay", default=0.0)
    adam_epsilon: float = _h("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _h("gradient clipping norm (0: off)", default=1.0)
    gradient_checkpointing: bool = _h("recompute activations in backward", default=False)
    set_grads_to_none: bool = _h("zero_grad(set_to_none=True): frees gradient memory between steps", default=True)
    use_ema: bool = _h("keep an EMA of the trained weights (validation, exports)", default=False)
    ema_decay: float = _h("EMA decay (with (1+n)/(10+n) warmup)", default=0.9999)
    mixed_precision: Literal["no", "fp16", "bf16"] = _h("accelerate mixed precision (bf16 works on CPU)",
                                                        default="no")
    allow_tf32: bool = _h("TF32 matmuls on Ampere+ GPUs", default=False)
    dataloader_num_workers: int = _h("DataLoader worker processes (0: load in the main process)", default=0)
    on_nonfinite: Literal["stop", "skip"] = _h("NaN/Inf loss or gradient: stop (error naming the step; checkpoints "
                                               "kept) or skip the update (diffusion.training.guards)", default="stop")
    # checkpoints
    checkpointing_steps: int = _h("save output_dir/checkpoint-N every N optimizer steps (and at the end)",
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
    # logging and validation
    report_to: str = field(default="tensorboard", metadata={
        "help": "accelerate tracker for losses and validation grids (not installed: an error at start)",
        "choices": REPORT_TO})
    tracker_project_name: str = _h("tracker run name (TensorBoard subdir of logging_dir)", default="train")
    logging_dir: str = _h("tracker directory, relative to output_dir", default="logs")
    logging_steps: int = _h("log the mean loss every N optimizer steps", default=10)
    progress_bar: bool = _h("tqdm progress bar (off: a line every logging_steps)", default=True)
    validation_steps: int = _h("validation grid every N optimizer steps (and at the end; 0: only at the end)",
                               default=500)
    sampler: str = _h("validation sampler (a name in diffusion.SAMPLERS)", default="dpmpp_2m")
    validation_inference_steps: int = _h("sampler steps for validation", default=20)
    validation_guidance_scale: float = _h("classifier-free guidance scale for validation (1: off)", default=3.0)
    ddp_timeout: int = _h("seconds a process waits for the others at a collective (multi-process; accelerate's "
                          "InitProcessGroupKwargs) before failing", default=1800)

    def __init_subclass__(cls, **kwargs):
        """Turn the subclass's DEFAULTS into re-declared fields (before @dataclass reads the class)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("DEFAULTS", {})
        if own:
            hints = typing.get_type_hints(TrainingArgs)
            cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}), **{k: hints[k] for k in own}}
            for name, value in own.items():
                setattr(cls, name, default(name, value))

    @property
    def weight_dtype(self):
        """The dtype of frozen parts under --mixed_precision (the trained module stays float32)."""
        import torch

        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.mixed_precision]

    def __post_init__(self):
        for key in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                    "logging_steps", "lr_num_cycles", "validation_inference_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; valid: {list(LR_SCHEDULERS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {sorted(SAMPLERS)}")
        if not self.validation_guidance_scale >= 0:
            raise ValueError(f"validation_guidance_scale must be >= 0 (1 disables guidance), got "
                             f"{self.validation_guidance_scale}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"unknown report_to {self.report_to!r}; valid: {list(REPORT_TO)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        check_run_args(self.output_dir, getattr(self, "resolution", None), self.checkpoints_total_limit,
                       self.ddp_timeout)
        check_optimizer_args({"learning_rate": self.learning_rate}, {"adam_epsilon": self.adam_epsilon},
                             {"max_grad_norm": self.max_grad_norm},
                             {"adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2},
                             {"adam_weight_decay": self.adam_weight_decay})


def default(name: str, value):
    """Re-declare the shared key `name` in a trainer's config with that trainer's default (same help, choices)."""
    f = TrainingArgs.__dataclass_fields__[name]
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: type(value)(value), metadata=f.metadata)
    return field(default=value, metadata=f.metadata)


def shared_flags() -> set[str]:
    """Names of the flags every trainer has (the vocabulary test compares them across trainers)."""
    from dataclasses import fields

    return {f.name for f in fields(TrainingArgs)}
