"""Sampling side of the rectified-flow task: conditions with CFG dropout (null class / empty prompt), images through
diffusion.sample, the fixed contents of the validation grid. Used by training and by scripts/eval_digits.py."""
from __future__ import annotations

import torch

from diffusion import classifier_free_guidance, generators_from_seeds, get_schedule, prior_sample, sample, wrap_model


def make_schedule(cfg, sampling: bool = False):
    if get_schedule(cfg.schedule).name == "rectified_flow":
        s = cfg.sample_shift if sampling and cfg.sample_shift is not None else cfg.shift
        return get_schedule(cfg.schedule, shift=s)
    return get_schedule(cfg.schedule)


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


def sample_images(net, cfg, conditioner: Conditioner, codec, x_shape, labels=None, texts=None,
                  seed: int = 0, cfg_scale: float | None = None, sampler: str | None = None,
                  steps: int | None = None, batch_size: int = 256, num: int = 1,
                  extra_cond: dict | None = None) -> torch.Tensor:
    """Generate images in [-1, 1] with diffusion.sample (CFG against the null class / empty prompt):
    one per label / text, or `num` unconditional ones; sample i starts from seed + i. `extra_cond`: per-sample
    network inputs beside the conditioner's (one row per sample), the same in both CFG branches (a ControlNet's
    controlnet_cond)."""
    schedule = make_schedule(cfg, sampling=True)
    device = next(net.parameters()).device
    model_fn = wrap_model(net, schedule, prediction=cfg.prediction, time_input=cfg.time_input)
    scale = cfg.validation_guidance_scale if cfg_scale is None else cfg_scale
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
        cond = {**conditioner(batch), **{k: v[lo:hi].to(device) for k, v in (extra_cond or {}).items()}}
        gens = generators_from_seeds([seed + i for i in range(lo, hi)])  # prior + sampler noise: one stream each
        x_T = prior_sample((hi - lo, *x_shape), schedule, generator=gens, device=device)
        with torch.no_grad():
            x0 = sample(model_fn, x_T, schedule, sampler=sampler or cfg.sampler,
                        steps=steps or cfg.validation_inference_steps, cond=cond, generator=gens)
        out.append(codec.decode(x0).cpu() if codec is not None else x0.clamp(-1, 1).cpu())
    return torch.cat(out)


def grid_conditions(cfg, num_classes: int, names, texts):
    """Fixed grid contents: every class x samples_per_class, or the first distinct captions."""
    if cfg.backbone == "dit":
        if num_classes == 0:  # unconditional
            return {"num": 8 * cfg.samples_per_class}, 8
        return {"labels": list(range(num_classes)) * cfg.samples_per_class}, num_classes
    prompts = list(dict.fromkeys(texts))[:8] if texts else list(names or [])[:10]
    return {"texts": prompts * cfg.samples_per_class}, len(prompts)
