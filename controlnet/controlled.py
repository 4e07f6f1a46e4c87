"""Frozen UNet + ControlNet(s) as one network (Zhang, Rao & Agrawala 2023), usable as a plain denoiser."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .model import ControlNet, ControlNetResiduals

# Keyword arguments that both the UNet and the ControlNet consume.
_SHARED_KWARGS = ("class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs")


def _as_list(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries for {n} ControlNets")
        return list(x)
    return [x] * n


class MultiControlNet(nn.Module):
    """Several ControlNets (Zhang et al. 2023, multi-condition composition): residuals are summed."""

    def __init__(self, controlnets: Sequence[ControlNet]):
        super().__init__()
        if len(controlnets) == 0:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        self.nets = nn.ModuleList(controlnets)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        for net in self.nets:
            net.enable_gradient_checkpointing(enabled)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond: Sequence[torch.Tensor],
                conditioning_scale: Union[float, Sequence[float]] = 1.0, guess_mode: bool = False,
                guess_mode_scales: str = "diffusers", added_cond_kwargs: Optional[dict] = None,
                **kwargs) -> ControlNetResiduals:
        """One condition (and scale) per ControlNet; returns the summed ``(down, mid)`` residuals."""
        if not isinstance(controlnet_cond, (list, tuple)):
            raise ValueError("MultiControlNet expects a list of conditions, one per ControlNet")
        conds = _as_list(controlnet_cond, len(self.nets), "controlnet_cond")
        scales = _as_list(conditioning_scale, len(self.nets), "conditioning_scale")
        down = mid = None
        for net, cond, scale in zip(self.nets, conds, scales):
            d, m = net(sample, timestep, encoder_hidden_states, cond, conditioning_scale=scale,
                       guess_mode=guess_mode, guess_mode_scales=guess_mode_scales,
                       added_cond_kwargs=added_cond_kwargs, **kwargs)
            down = d if down is None else tuple(a + b for a, b in zip(down, d))
            mid = m if mid is None else mid + m
        return ControlNetResiduals(down, mid)


class ControlledUNet(nn.Module):
    """A frozen diffusers UNet2DConditionModel steered by one or more ControlNets; returns the UNet's tensor.

    Called as ``net(x_t, t, encoder_hidden_states=..., controlnet_cond=...)`` it is a drop-in denoiser for
    ``diffusion.wrap_model``. ``controlnet_cond=None`` runs the bare UNet.

    Guess mode under classifier-free guidance: diffusers runs the ControlNet on the conditional half of the
    batch only and gives the unconditional half zero residuals. Here every row whose ``controlnet_cond`` is
    given is controlled by default (a condition batch equal to the sample batch, as produced when the CFG
    wrapper duplicates the keyword inputs); pass ``control_mask`` (bool, one entry per sample row) to control
    only some rows: the ControlNet then runs on those rows only and the others get zero residuals. With
    ``diffusion.classifier_free_guidance`` (``[cond | uncond]`` batches) put ``control_mask=ones`` in ``cond`` and
    ``control_mask=zeros`` in ``uncond`` (or ``controlnet_cond=None`` in ``uncond`` for the unbatched variant).
    """

    def __init__(self, unet: nn.Module, controlnet: Union[nn.Module, Sequence[ControlNet]],
                 freeze_unet: bool = True, resize_condition: bool = False):
        super().__init__()
        if isinstance(controlnet, (list, tuple)):
            controlnet = controlnet[0] if len(controlnet) == 1 else MultiControlNet(controlnet)
        self.unet = unet
        self.controlnet = controlnet
        self.freeze_unet = freeze_unet
        self.resize_condition = resize_condition
        if freeze_unet:
            unet.requires_grad_(False)  # no .grad and no autograd graph through UNet weights
            unet.eval()

    @property
    def config(self):
        return self.unet.config

    def train(self, mode: bool = True) -> "ControlledUNet":
        super().train(mode)
        if self.freeze_unet:
            self.unet.eval()
        return self

    def trainable_parameters(self):
        """Parameters to hand to the optimizer (the ControlNet's)."""
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def controlnet_residuals(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                             conditioning_scale=1.0, guess_mode=False, added_cond_kwargs=None,
                             control_mask: Optional[torch.Tensor] = None, guess_mode_scales: str = "diffusers",
                             **shared) -> Optional[ControlNetResiduals]:
        """Residuals for the whole batch; rows outside ``control_mask`` get zeros (ControlNet not run on them).

        With a mask, ``controlnet_cond`` may hold one row per sample row or one per selected row."""
        b = sample.shape[0]
        kw = dict(conditioning_scale=conditioning_scale, guess_mode=guess_mode, guess_mode_scales=guess_mode_scales,
                  resize_condition=self.resize_condition, **shared)
        if control_mask is None:
            return self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                   added_cond_kwargs=added_cond_kwargs, **kw)

        mask = torch.as_tensor(control_mask, dtype=torch.bool, device=sample.device).reshape(-1)
        if mask.numel() != b:
            raise ValueError(f"control_mask has {mask.numel()} entries for a batch of {b}")
        idx = mask.nonzero().flatten()
        if idx.numel() == 0:
            return None

        def rows(x):
            if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == b:
                return x.index_select(0, idx)
            if isinstance(x, dict):
                return {k: rows(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(rows(v) for v in x)
            return x

        kw.update({k: rows(v) for k, v in shared.items()})
        down, mid = self.controlnet(rows(sample), rows(timestep), rows(encoder_hidden_states),
                                    rows(controlnet_cond), added_cond_kwargs=rows(added_cond_kwargs), **kw)

        def scatter(r):  # zeros for the uncontrolled rows; index_copy keeps the graph to the ControlNet
            return r.new_zeros((b, *r.shape[1:])).index_copy(0, idx, r)

        return ControlNetResiduals(tuple(scatter(d) for d in down), scatter(mid))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: Optional[torch.Tensor] = None,
                controlnet_cond=None, conditioning_scale=1.0, guess_mode: bool = False,
                added_cond_kwargs: Optional[dict] = None, control_mask: Optional[torch.Tensor] = None,
                guess_mode_scales: str = "diffusers", only_mid_control: bool = False,
                **unet_kwargs) -> torch.Tensor:
        """UNet prediction with ControlNet residuals added to its skip connections and mid block.

        guess_mode_scales: "diffusers" or "original" guess-mode weights (see ``ControlNet.forward``).
        only_mid_control: the original ControlNet's option: only the mid residual is added, the skips get none."""
        shared = {k: unet_kwargs[k] for k in _SHARED_KWARGS if unet_kwargs.get(k) is not None}
        residuals = {}
        if controlnet_cond is not None:
            res = self.controlnet_residuals(sample, timestep, encoder_hidden_states, controlnet_cond,
                                            conditioning_scale, guess_mode, added_cond_kwargs, control_mask,
                                            guess_mode_scales, **shared)
            if res is not None:  # None: control_mask selected no row
                down = tuple(torch.zeros_like(d) for d in res[0]) if only_mid_control else res[0]
                # (diffusers' UNet ignores a mid residual given without skip residuals: pass zeros for the skips)
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=res[1])
        out = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                        return_dict=False, **residuals, **unet_kwargs)
        return out[0]
