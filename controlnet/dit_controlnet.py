"""ControlNet for DiT and the SD3 MM-DiT (Zhang, Rao & Agrawala 2023; SD3 ControlNet, cf. diffusers SD3ControlNetModel).

A trainable copy of the transformer's stem (patch embedding, time/label or pooled-text/context embeddings) and its
first N blocks. The condition image gets its own patch embedding and enters the copied token stream through a
zero-initialised linear; every copied block's output goes through a zero-initialised linear and becomes the residual
added to the image tokens after the matching block of the frozen base model. At init all residuals are exactly 0.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import torch
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from diffusion.models.dit import DiT, DiTBlock, LabelEmbedder, PatchTransformer
from diffusion.models.mmdit import JointBlock, MMDiT

__all__ = ["ARCHS", "RESIDUAL_MAPPINGS", "DiTControlNet", "ControlledTransformer", "map_residuals", "unused_residuals",
           "zero_linear"]

ARCHS = ("dit", "mmdit")
RESIDUAL_MAPPINGS = ("interval", "first")


def zero_linear(dim_in: int, dim_out: int | None = None) -> nn.Linear:
    """Linear layer with weight and bias set to zero (the token-space "zero convolution" of Zhang et al. 2023)."""
    lin = nn.Linear(dim_in, dim_out or dim_in)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _arch_of(model: nn.Module) -> str:
    if isinstance(model, MMDiT):
        return "mmdit"
    if isinstance(model, DiT):
        return "dit"
    raise ValueError(f"expected a diffusion.models.dit.DiT or diffusion.models.mmdit.MMDiT, got {type(model).__name__}")


def _pre_only_state(sd: dict, dim: int) -> dict:
    """Full JointBlock weights -> context-pre-only block: keep context K/V rows of qkv and the (shift, scale) chunks."""
    drop = ("attn_context.q_norm.", "attn_context.proj.", "norm2_context.", "mlp_context.")
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    for suffix in ("weight", "bias"):
        sd[f"attn_context.qkv.{suffix}"] = sd[f"attn_context.qkv.{suffix}"][dim:]  # rows [q | k | v] -> [k | v]
        sd[f"adaLN_modulation_context.1.{suffix}"] = sd[f"adaLN_modulation_context.1.{suffix}"][: 2 * dim]
    return sd


def _shape(x) -> tuple | None:
    return tuple(x.shape) if torch.is_tensor(x) else None


class DiTControlNet(PatchTransformer):
    """ControlNet for DiT / MM-DiT: copied stem + first N blocks, zero-init condition input and residual outputs.

    A diffusers ModelMixin: ``save_pretrained(d)`` / ``DiTControlNet.from_pretrained(d)`` (config.json, safetensors)."""

    @register_to_config
    def __init__(self, arch: str = "dit", num_layers: int = 2, input_size: int = 32, patch_size: int = 2,
                 in_channels: int = 4, hidden_size: int = 1152, num_heads: int = 16, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, conditioning_channels: int | None = None, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1, joint_attention_dim: int = 4096, pooled_projection_dim: int = 2048,
                 frequency_embedding_size: int = 256):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        super().__init__(input_size, patch_size, in_channels, hidden_size, in_channels, frequency_embedding_size)
        conditioning_channels = conditioning_channels or in_channels
        self.arch, self.num_layers, self.conditioning_channels = arch, num_layers, conditioning_channels
        self.register_to_config(conditioning_channels=conditioning_channels)  # resolved (None -> in_channels)
        if arch == "dit":
            self.num_classes = num_classes
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
            self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(num_layers))
        else:
            self.joint_attention_dim, self.pooled_projection_dim = joint_attention_dim, pooled_projection_dim
            self.pooled_embedder = nn.Sequential(nn.Linear(pooled_projection_dim, hidden_size), nn.SiLU(),
                                                 nn.Linear(hidden_size, hidden_size))
            self.context_embedder = nn.Linear(joint_attention_dim, hidden_size)
            # the last copy's context output would be unused: make it context-pre-only (K/V only), like the base's last
            self.blocks = nn.ModuleList(
                JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, context_pre_only=i == num_layers - 1)
                for i in range(num_layers))
        # condition path: own patch embedding, joined to the copied stream by a zero linear
        self.cond_embedder = nn.Conv2d(conditioning_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cond_proj = zero_linear(hidden_size)
        self.controlnet_blocks = nn.ModuleList(zero_linear(hidden_size) for _ in range(num_layers))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Base-style init (xavier, adaLN-Zero blocks) for a from-scratch net; cond_proj and residual heads zero."""
        self._init_base()
        w = self.cond_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.cond_embedder.bias)
        if self.arch == "dit" and self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            self._zero(block.adaLN_modulation[-1])
            if self.arch == "mmdit":
                self._zero(block.adaLN_modulation_context[-1])
        for lin in [self.cond_proj, *self.controlnet_blocks]:
            self._zero(lin)

    @classmethod
    def from_transformer(cls, model: nn.Module, num_layers: int | None = None,
                         conditioning_channels: int | None = None,
                         load_weights_from_transformer: bool = True) -> "DiTControlNet":
        """ControlNet for `model` (DiT or MMDiT) copying its stem and first `num_layers` blocks (default: all)."""
        arch, depth = _arch_of(model), len(model.blocks)
        num_layers = depth if num_layers is None else num_layers
        if not 1 <= num_layers <= depth:
            raise ValueError(f"num_layers must be in [1, {depth}] (the transformer's depth), got {num_layers}")
        b0 = model.blocks[0]
        cfg = dict(arch=arch, num_layers=num_layers, input_size=model.input_size, patch_size=model.patch_size,
                   in_channels=model.in_channels, hidden_size=model.hidden_size, num_heads=b0.attn.num_heads,
                   mlp_ratio=b0.mlp[0].out_features / model.hidden_size,
                   qk_norm=isinstance(b0.attn.k_norm, nn.RMSNorm), conditioning_channels=conditioning_channels,
                   frequency_embedding_size=model.t_embedder.frequency_embedding_size)
        if arch == "dit":
            emb = model.y_embedder
            cfg.update(num_classes=model.num_classes, class_dropout_prob=emb.dropout_prob if emb is not None else 0.0)
        else:
            cfg.update(joint_attention_dim=model.context_embedder.in_features,
                       pooled_projection_dim=model.pooled_embedder[0].in_features)
        p = next(model.parameters())
        net = cls(**cfg).to(device=p.device, dtype=p.dtype)
        if load_weights_from_transformer:
            names = ["x_embedder", "t_embedder"] + (["y_embedder"] if arch == "dit" else
                                                    ["pooled_embedder", "context_embedder"])
            for name in names:
                if getattr(model, name) is not None:
                    getattr(net, name).load_state_dict(getattr(model, name).state_dict())
            for i in range(num_layers):
                src = model.blocks[i].state_dict()
                if getattr(net.blocks[i], "context_pre_only", False) and not model.blocks[i].context_pre_only:
                    src = _pre_only_state(src, model.hidden_size)
                net.blocks[i].load_state_dict(src)
        return net

    def check_inputs(self, x, controlnet_cond, y=None, encoder_hidden_states=None, pooled_projections=None) -> None:
        """Raise ValueError naming the expected shape/channels for any mismatched input."""
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W) (in_channels={self.in_channels}), "
                             f"got {_shape(x)}")
        b, _, hgt, wid = x.shape
        p = self.patch_size
        if hgt % p or wid % p:
            raise ValueError(f"x height/width {hgt}x{wid} must be divisible by patch_size={p}")
        cc = self.conditioning_channels
        if (not torch.is_tensor(controlnet_cond) or controlnet_cond.ndim != 4 or controlnet_cond.shape[1] != cc
                or controlnet_cond.shape[2:] != x.shape[2:] or controlnet_cond.shape[0] not in (1, b)):
            raise ValueError(f"controlnet_cond must be ({b} or 1, {cc}, {hgt}, {wid}): conditioning_channels={cc} "
                             f"and the same height/width as x; got {_shape(controlnet_cond)}")
        if self.arch == "dit":
            if encoder_hidden_states is not None or pooled_projections is not None:
                raise ValueError("a DiT ControlNet takes class labels y, not encoder_hidden_states/pooled_projections")
            if y is not None and (not torch.is_tensor(y) or tuple(y.shape) != (b,)):
                raise ValueError(f"y must be a ({b},) tensor of class labels, got {_shape(y)}")
            return
        if y is not None:
            raise ValueError("an MMDiT ControlNet takes encoder_hidden_states and pooled_projections, not y")
        ehs, pooled = encoder_hidden_states, pooled_projections
        if not torch.is_tensor(ehs) or ehs.ndim != 3 or ehs.shape[0] != b or ehs.shape[2] != self.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be ({b}, L, {self.joint_attention_dim}) "
                             f"(joint_attention_dim={self.joint_attention_dim}), got {_shape(ehs)}")
        if not torch.is_tensor(pooled) or tuple(pooled.shape) != (b, self.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be ({b}, {self.pooled_projection_dim}) "
                             f"(pooled_projection_dim={self.pooled_projection_dim}), got {_shape(pooled)}")

    def forward(self, x: torch.Tensor, t, controlnet_cond: torch.Tensor, y: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, pooled_projections: torch.Tensor | None = None,
                conditioning_scale: Union[float, torch.Tensor] = 1.0,
                force_drop_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (B,C,H,W), t (B,) float signal, controlnet_cond (B,Cc,H,W) -> num_layers residuals (B, h*w, D)."""
        self.check_inputs(x, controlnet_cond, y, encoder_hidden_states, pooled_projections)
        tok, _, _ = self.embed(x)  # (B,N,D)
        hint = rearrange(self.cond_embedder(controlnet_cond.to(tok.dtype)), "b d h w -> b (h w) d")
        tok = tok + self.cond_proj(hint)  # broadcasts a batch-1 condition
        c = self._time(t, x)  # (B,D)
        hidden = []
        if self.arch == "dit":
            if self.y_embedder is not None:
                if y is None:
                    y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
                c = c + self.y_embedder(y, force_drop_ids)
            for block in self.blocks:
                tok = self._block(block, tok, c)
                hidden.append(tok)
        else:
            ctx = self.context_embedder(encoder_hidden_states)  # (B,L,D)
            c = c + self.pooled_embedder(pooled_projections)
            for block in self.blocks:
                tok, ctx = self._block(block, tok, ctx, c)
                hidden.append(tok)
        scale = torch.as_tensor(conditioning_scale, dtype=tok.dtype, device=tok.device)
        scale = scale.reshape(-1, 1, 1) if scale.ndim == 1 else scale  # per-sample scales (B,)
        return [head(h) * scale for head, h in zip(self.controlnet_blocks, hidden)]


def map_residuals(residuals: Sequence[torch.Tensor], depth: int, mapping: str = "interval",
                  skip_blocks: Sequence[int] = ()) -> list:
    """Spread N ControlNet residuals over `depth` base blocks: "interval" gives block i residual floor(i N / depth)
    (diffusers SD3), "first" gives the first N blocks one each and the rest None. Blocks in `skip_blocks` get None
    (diffusers SD3 adds nothing after its context-pre-only last block)."""
    n = len(residuals)
    if mapping not in RESIDUAL_MAPPINGS:
        raise ValueError(f"unknown residual_mapping {mapping!r}; valid: {list(RESIDUAL_MAPPINGS)}")
    if not 1 <= n <= depth:
        raise ValueError(f"got {n} residuals for a transformer of depth {depth}; need 1 to {depth}")
    if mapping == "first":
        out = list(residuals) + [None] * (depth - n)
    else:
        out = [residuals[i * n // depth] for i in range(depth)]
    return [None if i in skip_blocks else r for i, r in enumerate(out)]


def unused_residuals(n: int, depth: int, mapping: str = "interval", skip_blocks: Sequence[int] = ()) -> list[int]:
    """Indices of the N residuals that `map_residuals` gives to no block (their ControlNet block gets no gradient)."""
    used = set(map_residuals(list(range(n)), depth, mapping, skip_blocks))
    return [k for k in range(n) if k not in used]


def per_net(value, n: int, name: str) -> list:
    """One value per ControlNet: a list of n, or one value shared (a condition must be given per net)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} ControlNets; pass one per ControlNet")
        return list(value)
    if n > 1 and name == "controlnet_cond":
        raise ValueError(f"{n} ControlNets need a list of {n} conditions ({name}), one per ControlNet")
    return [value] * n


class ControlledTransformer(nn.Module):
    """A (frozen) DiT / MMDiT steered by DiTControlNets (Zhang et al. 2023), usable as a plain net(x, t, **cond).

    ``cond`` holds the base model's conditioning (``y`` or ``encoder_hidden_states``/``pooled_projections``) plus
    ``controlnet_cond`` (a tensor, or a list with one per ControlNet; None runs the bare transformer) and
    ``conditioning_scale`` (float, (B,) tensor, or one per ControlNet). Residuals of several ControlNets are summed.
    As in diffusers' SD3Transformer2DModel, an MM-DiT's context-pre-only last block gets no residual.
    """

    def __init__(self, transformer: nn.Module, controlnet: Union[DiTControlNet, Sequence[DiTControlNet]],
                 freeze_transformer: bool = True, residual_mapping: str = "interval"):
        super().__init__()
        arch = _arch_of(transformer)
        nets = list(controlnet) if isinstance(controlnet, (list, tuple, nn.ModuleList)) else [controlnet]
        if not nets:
            raise ValueError("ControlledTransformer needs at least one DiTControlNet")
        if residual_mapping not in RESIDUAL_MAPPINGS:
            raise ValueError(f"unknown residual_mapping {residual_mapping!r}; valid: {list(RESIDUAL_MAPPINGS)}")
        depth = len(transformer.blocks)
        for k, net in enumerate(nets):
            if not isinstance(net, DiTControlNet):
                raise ValueError(f"controlnet {k} is a {type(net).__name__}; expected a DiTControlNet")
            want = dict(arch=arch, hidden_size=transformer.hidden_size, patch_size=transformer.patch_size,
                        in_channels=transformer.in_channels)
            got = {key: net.config[key] for key in want}
            if got != want:
                raise ValueError(f"controlnet {k} does not fit the transformer: expected {want}, got {got} "
                                 f"(build it with DiTControlNet.from_transformer(transformer, num_layers=...))")
            if net.num_layers > depth:
                raise ValueError(f"controlnet {k} has {net.num_layers} layers for a transformer of depth {depth}")
        # diffusers SD3 adds no residual after a context-pre-only block (the MM-DiT's last one)
        self.skip_blocks = tuple(i for i, b in enumerate(transformer.blocks) if getattr(b, "context_pre_only", False))
        for k, net in enumerate(nets):
            unused = unused_residuals(net.num_layers, depth, residual_mapping, self.skip_blocks)
            if unused:
                warnings.warn(f"controlnet {k}: residual(s) {unused} of {net.num_layers} reach no block (the MM-DiT's "
                              f"last block is context-pre-only and takes none, as in diffusers SD3), so their "
                              f"ControlNet blocks get no gradient; use num_layers <= {max(1, depth // 2)} with "
                              f"residual_mapping='interval' or num_layers < {depth} with 'first'", stacklevel=2)
        self.arch, self.residual_mapping, self.freeze_transformer = arch, residual_mapping, freeze_transformer
        self.transformer = transformer
        self.controlnets = nn.ModuleList(nets)
        if freeze_transformer:
            transformer.requires_grad_(False)
            transformer.eval()

    @property
    def controlnet(self) -> DiTControlNet:
        """The first (usually only) ControlNet."""
        return self.controlnets[0]

    def train(self, mode: bool = True) -> "ControlledTransformer":
        super().train(mode)
        if self.freeze_transformer:
            self.transformer.eval()
        return self

    def trainable_parameters(self) -> list:
        """Parameters to hand to the optimizer (the ControlNets')."""
        return [p for p in self.controlnets.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in backward, in the ControlNets and in the base (gradients flow through its activations)."""
        self.transformer.enable_gradient_checkpointing(enable)
        for net in self.controlnets:
            net.enable_gradient_checkpointing(enable)

    def block_residuals(self, x, t, controlnet_cond, conditioning_scale=1.0, **cond) -> list:
        """Summed residuals of all ControlNets, one entry (or None) per base block."""
        depth, out = len(self.transformer.blocks), None
        conds = per_net(controlnet_cond, len(self.controlnets), "controlnet_cond")
        scales = per_net(conditioning_scale, len(self.controlnets), "conditioning_scale")
        for net, image, scale in zip(self.controlnets, conds, scales):
            res = map_residuals(net(x, t, image, conditioning_scale=scale, **cond), depth, self.residual_mapping,
                                self.skip_blocks)
            out = res if out is None else [a if b is None else b if a is None else a + b for a, b in zip(out, res)]
        return out

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, pooled_projections: torch.Tensor | None = None,
                controlnet_cond=None, conditioning_scale=1.0, force_drop_ids: torch.Tensor | None = None):
        """Base prediction with ControlNet residuals added to the image tokens after each (mapped) block."""
        if self.arch == "dit":
            cond = dict(y=y, force_drop_ids=force_drop_ids)
            emb = self.controlnet.y_embedder
            if (self.training and y is not None and force_drop_ids is None and emb is not None
                    and emb.dropout_prob > 0):  # one label-dropout draw shared by base and ControlNets (CFG training)
                cond["force_drop_ids"] = torch.rand(x.shape[0], device=x.device) < emb.dropout_prob
        else:
            if y is not None or force_drop_ids is not None:
                raise ValueError("an MMDiT takes encoder_hidden_states and pooled_projections, not y/force_drop_ids")
            cond = dict(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections)
        res = None
        if controlnet_cond is not None:
            res = self.block_residuals(x, t, controlnet_cond, conditioning_scale, **cond)
        if self.arch == "dit":
            return self.transformer(x, t, y, force_drop_ids=cond["force_drop_ids"], block_residuals=res)
        return self.transformer(x, t, encoder_hidden_states, pooled_projections, block_residuals=res)
