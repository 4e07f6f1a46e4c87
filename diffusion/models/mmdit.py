"""SD3 multimodal diffusion transformer (MMDiT; Esser et al. 2024, arXiv:2403.03206, Sec. 4 / Fig. 2).

Like ``diffusion.models.dit`` it knows nothing about noise: it maps (x, t, text tokens, pooled text) to a tensor shaped
like x; the caller picks the scale of t (SD3 feeds 1000 * t).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config

from .dit import Attention, FinalLayer, PatchTransformer, adaln, layer_norm, mlp, modulate

__all__ = ["JointBlock", "MMDiT", "MMDIT_MODELS", "build_mmdit"]


class JointBlock(nn.Module):
    """MMDiT block (SD3 Fig. 2b): separate weights per stream, one attention over [context; image]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        # image stream (adaLN-Zero: shift/scale/gate for attention and MLP)
        self.norm1, self.norm2 = layer_norm(hidden_size), layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.mlp = mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = adaln(hidden_size, 6)
        # context stream; the last block's is "pre-only": it only supplies K, V (shift/scale, no output, no MLP)
        self.norm1_context = layer_norm(hidden_size)
        self.attn_context = Attention(hidden_size, num_heads, qk_norm=qk_norm, kv_only=context_pre_only)
        self.adaLN_modulation_context = adaln(hidden_size, 2 if context_pre_only else 6)
        if not context_pre_only:
            self.norm2_context = layer_norm(hidden_size)
            self.mlp_context = mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor):
        """x (B,N,D) image, ctx (B,L,D) text, c (B,D) -> (x', ctx') with ctx' None for a pre-only block."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)  # each (B,D)
        mod_c = self.adaLN_modulation_context(c).chunk(2 if self.context_pre_only else 6, dim=1)
        q, k, v = self.attn.project(modulate(self.norm1(x), sh1, sc1))  # (B,H,N,d)
        cq, ck, cv = self.attn_context.project(modulate(self.norm1_context(ctx), mod_c[0], mod_c[1]))  # (B,H,L,d)
        k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # joint keys/values over [context; image]
        if self.context_pre_only:
            o, ctx = F.scaled_dot_product_attention(q, k, v), None  # image queries only
        else:
            L = ctx.shape[1]
            o = F.scaled_dot_product_attention(torch.cat([cq, q], dim=2), k, v)  # (B,H,L+N,d)
            co, o = o[:, :, :L], o[:, :, L:]
            _, _, cg1, csh2, csc2, cg2 = mod_c
            ctx = ctx + cg1[:, None] * self.attn_context.out(co)
            ctx = ctx + cg2[:, None] * self.mlp_context(modulate(self.norm2_context(ctx), csh2, csc2))
        x = x + g1[:, None] * self.attn.out(o)
        x = x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x, ctx


class MMDiT(PatchTransformer):
    """SD3 MMDiT: text/image streams with joint attention, conditioned on timestep + pooled text (Esser et al. 2024)."""

    @register_to_config
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, depth: int = 24,
                 hidden_size: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 joint_attention_dim: int = 4096, pooled_projection_dim: int = 2048,
                 out_channels: int | None = None, qk_norm: bool = True, frequency_embedding_size: int = 256):
        hidden_size = hidden_size or 64 * depth  # SD3 Sec. 5.3: hidden = 64 * depth, heads = depth
        num_heads = num_heads or depth
        out_channels = out_channels or in_channels
        super().__init__(input_size, patch_size, in_channels, hidden_size, out_channels, frequency_embedding_size)
        self.register_to_config(hidden_size=hidden_size, num_heads=num_heads, out_channels=out_channels)  # resolved
        self.depth = depth
        self.pooled_embedder = nn.Sequential(nn.Linear(pooled_projection_dim, hidden_size), nn.SiLU(),
                                             nn.Linear(hidden_size, hidden_size))
        self.context_embedder = nn.Linear(joint_attention_dim, hidden_size)
        self.blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, context_pre_only=i == depth - 1)
            for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT-style init: xavier linears; adaLN-Zero modulation of both streams and the final layer set to zero."""
        self._init_base()
        for block in self.blocks:
            self._zero(block.adaLN_modulation[-1])
            self._zero(block.adaLN_modulation_context[-1])
        self._zero(self.final_layer.adaLN_modulation[-1])
        self._zero(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, block_residuals=None) -> torch.Tensor:
        """x (B,C,H,W), t (B,) float, encoder_hidden_states (B,L,Dc), pooled_projections (B,Dp) -> (B,C_out,H,W).

        block_residuals: optional per-block image-token residuals (ControlNet), as in DiT.forward."""
        self._check_residuals(block_residuals)
        tok, h, w = self.embed(x)  # (B,N,D)
        ctx = self.context_embedder(encoder_hidden_states)  # (B,L,D)
        c = self._time(t, x) + self.pooled_embedder(pooled_projections)  # (B,D)
        for i, block in enumerate(self.blocks):
            tok, ctx = self._block(block, tok, ctx, c)
            tok = self._residual(tok, block_residuals, i)
        return self.unpatchify(self.final_layer(tok, c), h, w)


MMDIT_MODELS = {  # depth-parameterized like SD3 (hidden 64*d, heads d); Tiny uses small text dims for tests
    "MMDiT-Tiny": partial(MMDiT, depth=2, joint_attention_dim=64, pooled_projection_dim=64),
    "MMDiT-d12": partial(MMDiT, depth=12),
    "MMDiT-d24": partial(MMDiT, depth=24),  # SD3-medium size (~2B)
    "MMDiT-d38": partial(MMDiT, depth=38),  # SD3 8B size
}


def build_mmdit(name: str, **kwargs) -> MMDiT:
    """Build an MMDiT by name (e.g. "MMDiT-d24"); kwargs override the size config (input_size, in_channels, ...)."""
    if name not in MMDIT_MODELS:
        raise ValueError(f"unknown MMDiT model {name!r}; valid names: {', '.join(MMDIT_MODELS)}")
    return MMDIT_MODELS[name](**kwargs)
