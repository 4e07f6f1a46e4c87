"""SD3 ControlNet training (Esser et al. 2024; Zhang et al. 2023) with the flags of diffusers' train_controlnet_sd3.py.

A diffusers SD3ControlNetModel (SD3ControlNetModel.from_transformer of the frozen base: its first blocks copied,
zero-initialised condition embedding and per-block output layers) learns on a frozen SD3Transformer2DModel, VAE and
CLIP / CLIP / optional T5 encoders with the rectified-flow objective x_t = (1 - t) x0 + t eps:
- t: u from the --weighting_scheme density (diffusion.losses.sample_timesteps: logit_normal, mode; uniform for
  cosmap / sigma_sqrt / none), then diffusers' index into the scheduler's training sigmas, t = shift(1 - floor(u N) / N)
  (so --logit_mean keeps diffusers' sign: positive means less noise);
- loss: E w(t) ||v - (eps - x0)||^2 with w = s^-2 (sigma_sqrt), the cosmap density (cosmap) or 1, times t^2 with
  --precondition_outputs 1: diffusers' x0 regression ||x_t - t v - x0||^2 is exactly t^2 ||v - (eps - x0)||^2;
- conditions go through the VAE as at sampling (SD3ControlNetPipeline.encode_condition: [-1, 1] pixels, latents
  shifted and scaled; no shift and zero pooled text for a ControlNet with force_zeros_for_pooled_projection, which
  from_transformer sets), so a trained ControlNet samples as it was trained in our and diffusers' pipelines
  (diffusers' script feeds [0, 1] pixels and always shifts, unlike its own pipeline);
- residuals: one per ControlNet block; the transformer adds residual floor(i K / L) after its block i and none after
  its last, context-pre-only block, which the ControlNet never copies (from_transformer cannot copy it). K must be at
  most L - 1 and every residual must reach a block (else the DDP all-reduce would wait for unused parameters).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffusion import RectifiedFlow
from diffusion.losses import DiffusionLoss, density_pdf, sample_timesteps
from diffusion.schedule import shift_time
from diffusion.training.preflight import load_or_explain, require_local_dir

from .pipeline_sd3 import SD3ControlNetPipeline, load_sd3_components
from .training import SDXL_ONLY, ControlNetTask, build_dataset, validation_pairs

__all__ = ["SD3ControlNetTask", "sd3_training_times", "sd3_loss_weights", "residual_targets", "preflight_sd3"]

DENSITY = {"logit_normal": "logit_normal", "mode": "mode"}  # the other weighting schemes draw u uniformly
SD3_FILES = ("transformer/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
             "tokenizer", "tokenizer_2", "scheduler/scheduler_config.json")


def sd3_training_times(u: torch.Tensor, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """u in [0, 1] -> t (float64): diffusers' FlowMatchEulerDiscreteScheduler training sigma at index floor(u N)."""
    n = num_train_timesteps
    index = torch.floor(u.double() * n).clamp(0, n - 1)
    return shift_time(1 - index / n, shift)


def sd3_loss_weights(weighting_scheme: str, t: torch.Tensor, precondition_outputs: bool) -> torch.Tensor:
    """Per-sample weight of ||v - (eps - x0)||^2 (float64): diffusers' compute_loss_weighting_for_sd3, times t^2 for
    the x0-regression (--precondition_outputs) form."""
    t = t.double()
    w = t ** -2 if weighting_scheme == "sigma_sqrt" else density_pdf("cosmap", t) \
        if weighting_scheme == "cosmap" else torch.ones_like(t)
    return w * t ** 2 if precondition_outputs else w


def residual_targets(base_layers: int, controlnet_layers: int) -> list[int]:
    """Which ControlNet residual each transformer block adds (diffusers: int(i / (L / K)); none for the last,
    context-pre-only block)."""
    interval = base_layers / controlnet_layers
    return [int(i / interval) for i in range(base_layers - 1)]


def default_num_layers(base_layers: int) -> int:
    """diffusers' from_transformer default (12), capped so that every residual reaches a block."""
    return max(1, min(12, base_layers // 2))


def preflight_sd3(cfg) -> None:
    """SD3 layout, flags and a starting ControlNet checked before anything loads (ValueError naming the fix)."""
    from .families import family_configs
    from .preflight import read_json

    given = [k for k, unset in SDXL_ONLY.items() if getattr(cfg, k) != unset]
    if given:
        raise ValueError(f"--{', --'.join(given)}: SDXL only, but {cfg.pretrained_model_name_or_path} is an SD3 "
                         f"pipeline; drop the flag(s)")
    base = require_local_dir(cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path", SD3_FILES)
    tr = read_json(base / "transformer" / "config.json")
    vae = read_json(base / "vae" / "config.json")
    sched = read_json(base / "scheduler" / "scheduler_config.json")
    if sched.get("use_dynamic_shifting"):
        raise ValueError(f"{base / 'scheduler'}: use_dynamic_shifting is on; SD3 ControlNet training needs a fixed "
                         f"shift (FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=false, as SD3 ships)")
    if cfg.num_extra_conditioning_channels:
        raise ValueError(f"--num_extra_conditioning_channels {cfg.num_extra_conditioning_channels}: the conditions "
                         f"are VAE latents with {vae.get('latent_channels')} channels and nothing fills extra ones "
                         f"(inpainting masks); pass 0")
    if cfg.weighting_scheme == "mode" and not -1 <= cfg.mode_scale <= 2 / (torch.pi - 2):
        raise ValueError(f"--mode_scale must lie in [-1, {2 / (torch.pi - 2):.4f}] (monotone f_mode), got "
                         f"{cfg.mode_scale}")
    if cfg.logit_std <= 0:
        raise ValueError(f"--logit_std must be > 0, got {cfg.logit_std}")
    multiple = 2 ** (len(vae.get("block_out_channels", [0])) - 1) * tr.get("patch_size", 2)
    if cfg.resolution % multiple:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of {multiple} (VAE factor x patch size)")
    layers = tr.get("num_layers", 1)
    k = cfg.controlnet_num_layers or default_num_layers(layers)
    if cfg.controlnet_model_name_or_path:
        c = Path(cfg.controlnet_model_name_or_path)
        cn = family_configs("sd3", base, c)["controlnet"]  # class, kinds and fit to the base, as cn-sample checks
        if cn.get("use_pos_embed") is False:
            raise ValueError(f"--controlnet_model_name_or_path {c}: a ControlNet without its own position "
                             f"embedding (SD3.5-8b style) is not trainable here; start from one with use_pos_embed")
        k = cn.get("num_layers", k)
    elif cfg.controlnet_num_layers is not None and not 1 <= k < layers:
        raise ValueError(f"--controlnet_num_layers {k}: must lie in [1, {layers - 1}] (the base has {layers} blocks, "
                         f"the last of them context-pre-only, which a ControlNet cannot copy)")
    if set(residual_targets(layers, k)) != set(range(k)):
        raise ValueError(f"a ControlNet of {k} blocks on a {layers}-block transformer: residuals "
                         f"{sorted(set(range(k)) - set(residual_targets(layers, k)))} reach no block (the last, "
                         f"context-pre-only block takes none); use at most {layers // 2} blocks "
                         f"(--controlnet_num_layers)")
    missing = [p for p in cfg.validation_image if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--validation_image: {missing} not found")


def freeze_discarded_text_output(controlnet) -> None:
    """The last ControlNet block's text-stream output is discarded, so its context out-projection and feed-forward
    never get a gradient (diffusers trains with find_unused_parameters and AdamW skips them); frozen, they stay as
    copied and DDP's gradient all-reduce covers exactly the parameters in use."""
    if controlnet.context_embedder is not None:
        last = controlnet.transformer_blocks[-1]
        for part in (last.attn.to_add_out, last.ff_context, getattr(last, "norm2_context", None)):
            if part is not None:
                part.requires_grad_(False)


def _cast(module, dtype):
    return module if next(module.parameters()).dtype == dtype else module.to(dtype=dtype)


class SD3ControlNetTask(ControlNetTask):
    """Only the SD3ControlNetModel learns (float32); transformer, VAE and text encoders are frozen in the
    mixed-precision dtype (the VAE in float32 with --upcast_vae)."""

    name = "train_controlnet_sd3"

    def preflight(self):
        preflight_sd3(self.cfg)

    def build(self):
        from diffusers import SD3ControlNetModel

        cfg, acc = self.cfg, self.accelerator
        dataset = build_dataset(cfg)
        dtype = cfg.weight_dtype
        path = cfg.pretrained_model_name_or_path
        c = load_or_explain("SD3 components", path, lambda: load_sd3_components(path, device=acc.device))
        torch.manual_seed(cfg.seed)
        if cfg.controlnet_model_name_or_path:
            controlnet = load_or_explain("starting SD3 ControlNet", cfg.controlnet_model_name_or_path,
                                         lambda: SD3ControlNetModel.from_pretrained(cfg.controlnet_model_name_or_path,
                                                                                    local_files_only=True))
        else:  # from the float32 base, before it is cast (as diffusers)
            layers = cfg.controlnet_num_layers or default_num_layers(c["transformer"].config.num_layers)
            controlnet = SD3ControlNetModel.from_transformer(c["transformer"], num_layers=layers,
                                                             num_extra_conditioning_channels=0)
        controlnet = _cast(controlnet.to(acc.device), torch.float32).train()
        freeze_discarded_text_output(controlnet)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if c[name] is not None:
                keep = name == "vae" and cfg.upcast_vae
                _cast(c[name].requires_grad_(False).eval(), torch.float32 if keep else dtype)
        self.pipe = SD3ControlNetPipeline(c["transformer"], c["vae"], c["text_encoder"], c["text_encoder_2"],
                                          c["tokenizer"], c["tokenizer_2"], c["scheduler_config"], controlnet,
                                          c["text_encoder_3"], c["tokenizer_3"])
        if not isinstance(self.pipe.schedule, RectifiedFlow):
            raise ValueError(f"{path}: scheduler {c['scheduler_config'].get('_class_name')} is not a flow-matching "
                             f"scheduler; SD3 ControlNet training needs FlowMatchEulerDiscreteScheduler")
        if cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            c["transformer"].enable_gradient_checkpointing()
        self.objective = DiffusionLoss(self.pipe.schedule, "velocity", time_input=self.pipe.time_input)
        self.pairs = validation_pairs(cfg, dataset) if acc.is_main_process else []
        return dataset, controlnet

    def velocity(self, controlnet, x_t, timestep, states, pooled, cond):
        """The frozen transformer's velocity with `controlnet`'s block residuals (`controlnet` may be DDP-wrapped)."""
        config = getattr(controlnet, "module", controlnet).config
        res = controlnet(hidden_states=x_t, controlnet_cond=cond, timestep=timestep,
                         encoder_hidden_states=states if config.joint_attention_dim is not None else None,
                         pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection
                         else pooled, return_dict=False)[0]
        return self.pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=states,
                                     pooled_projections=pooled, return_dict=False,
                                     block_controlnet_hidden_states=[r.to(x_t.dtype) for r in res])[0]

    def loss(self, model, batch, generator, reduction: str = "mean"):
        """Draw order from `generator`: caption dropout, image posterior, condition posterior, u, noise."""
        cfg, pipe = self.cfg, self.pipe
        drop = torch.rand(len(batch["text"]), generator=generator) < cfg.proportion_empty_prompts
        texts = ["" if d else t for t, d in zip(batch["text"], drop.tolist())]
        x0 = pipe.encode_images(batch["pixel_values"], generator=generator).to(pipe.dtype)
        cond = pipe.encode_condition(batch["conditioning_pixel_values"].to(pipe.device),
                                     getattr(model, "module", model), generator)
        states, pooled = (e.to(pipe.dtype) for e in pipe.encode_prompt(texts, cfg.max_sequence_length))
        u = sample_timesteps(DENSITY.get(cfg.weighting_scheme, "uniform"), x0.shape[0], generator,
                             dtype=torch.float64, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                             mode_scale=cfg.mode_scale)
        t = sd3_training_times(u, pipe.schedule.shift, pipe.scheduler_config.get("num_train_timesteps", 1000))
        per_sample = self.objective(lambda x_t, ts: self.velocity(model, x_t, ts, states, pooled, cond),
                                    x0, t=t.to(x0.device), generator=generator, reduction="none")
        loss = per_sample * sd3_loss_weights(cfg.weighting_scheme, t, cfg.precondition_outputs).to(per_sample)
        return loss if reduction == "none" else loss.mean()

    def validate(self, model, step):
        if self.pairs and next(model.parameters()).dtype != self.pipe.dtype:
            # a plain copy in the base's dtype (the prepared module's forward returns float32 under mixed precision)
            plain = type(model).from_config(model.config)
            plain.load_state_dict(model.state_dict())
            model = _cast(plain, self.pipe.dtype).to(self.pipe.device).eval()
        return super().validate(model, step)

