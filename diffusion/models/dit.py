"""Diffusion Transformer (DiT; Peebles & Xie 2023, arXiv:2212.09748) used as a rectified-flow velocity network.

The network knows nothing about noise: it maps (x, t, conditioning) to a tensor shaped like x, and the caller
chooses the scale of the float time signal t (e.g. 1000 * t for t in [0, 1]). Shared layers live here and are
reused by the SD3 MMDiT in ``diffusion/mmdit.py``.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .pretrained import PretrainedModel

__all__ = [
    "sincos_1d", "sincos_pos_embed_2d", "timestep_embedding", "modulate",
    "TimestepEmbedder", "LabelEmbedder", "Attention", "DiTBlock", "FinalLayer",
    "PatchTransformer", "DiT", "DIT_MODELS", "build_dit",
]


# ----------------------------------------------------------------------------------------------- embeddings
def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1D sin-cos embedding [sin(p w_k) | cos(p w_k)], w_k = 10000^(-k/(dim/2)) (Vaswani 2017; MAE/DiT layout)."""
    assert dim % 2 == 0, "sin-cos dim must be even"
    omega = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    ang = pos.to(torch.float64).flatten()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=1)  # (N, dim)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (DiT Sec. 3.1): first half encodes the column, second the row -> (h*w, dim)."""
    assert dim % 4 == 0, "hidden size must be divisible by 4 for 2D sin-cos embedding"
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each, row-major tokens
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()  # (h*w, dim)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal frequency embedding [cos | sin] of a float time signal (DiT/ADM; SD3 flip_sin_to_cos): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([ang.cos(), ang.sin()], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift (DiT Sec. 3.2): x (B,N,D), shift/scale (B,D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def mlp(dim: int, ratio: float = 4.0) -> nn.Sequential:
    """Transformer MLP with tanh-GELU (DiT/SD3): (.., D) -> (.., D)."""
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def adaln(dim: int, n: int) -> nn.Sequential:
    """adaLN regression head SiLU -> Linear(D, n*D) producing shift/scale/gate chunks (DiT Sec. 3.2)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, n * dim))


def layer_norm(dim: int) -> nn.LayerNorm:
    """Affine-free LayerNorm (eps 1e-6) whose scale/shift come from adaLN (DiT Sec. 3.2)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class TimestepEmbedder(nn.Module):
    """Time embedding: sinusoidal frequencies -> MLP (DiT Sec. 3.2): t (B,) -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (index num_classes) and label dropout for CFG (DiT Sec. 3.2; Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # last row = null class

    def drop(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class where force_drop_ids == 1, else (training only) with prob dropout_prob."""
        if force_drop_ids is not None:
            dropped = force_drop_ids.to(y.device).bool()
        elif self.training and self.dropout_prob > 0:
            dropped = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            return y
        return torch.where(dropped, torch.full_like(y, self.num_classes), y)

    def forward(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding_table(self.drop(y, force_drop_ids))  # (B,) -> (B, D)


# ----------------------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head attention via SDPA with optional QK RMSNorm (SD3 Sec. 5.3.2); kv_only serves SD3's pre-only context."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, kv_only: bool = False):
        super().__init__()
        assert dim % num_heads == 0, "hidden size must be divisible by num_heads"
        self.num_heads, self.kv_only = num_heads, kv_only
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, (2 if kv_only else 3) * dim)
        norm = (lambda: nn.RMSNorm(head_dim, eps=1e-6)) if qk_norm else nn.Identity
        self.q_norm = None if kv_only else norm()
        self.k_norm = norm()
        self.proj = None if kv_only else nn.Linear(dim, dim)

    def project(self, x: torch.Tensor):
        """(B,N,D) -> q (None if kv_only), k, v each (B,H,N,d); q and k are normalized."""
        parts = rearrange(self.qkv(x), "b n (s h d) -> s b h n d", s=2 if self.kv_only else 3, h=self.num_heads)
        q = None if self.kv_only else self.q_norm(parts[0])
        return q, self.k_norm(parts[-2]), parts[-1]

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Merge heads and project: (B,H,N,d) -> (B,N,D)."""
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.out(F.scaled_dot_product_attention(q, k, v))  # (B,N,D)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (DiT Sec. 3.2, Fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(hidden_size), layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.mlp = mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = adaln(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B,N,D), c (B,D) -> (B,N,D)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)  # each (B,D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """Final adaLN + linear to patch pixels (DiT Sec. 3.2): (B,N,D), (B,D) -> (B,N,p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = adaln(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------- models
class PatchTransformer(PretrainedModel):
    """Shared patchify / fixed sin-cos positions / unpatchify / checkpointing for DiT and MMDiT (DiT Sec. 3.1).

    A diffusers ModelMixin + ConfigMixin: subclasses register their constructor arguments, so ``save_pretrained(d)``
    writes config.json + safetensors and ``Cls.from_pretrained(d)`` rebuilds and loads the network in one call."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, out_channels: int,
                 frequency_embedding_size: int = 256):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.out_channels, self.hidden_size = in_channels, out_channels, hidden_size
        self.gradient_checkpointing = False
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        g = input_size // patch_size
        # fixed (not learned, not saved) positions for the configured size; other sizes are computed on the fly
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, g, g)[None], persistent=False)

    def enable_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""
        self.gradient_checkpointing = enable

    def _block(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _residual(self, tok: torch.Tensor, block_residuals, i: int) -> torch.Tensor:
        """Add the optional per-block residual (ControlNet hook) to the image tokens after block i."""
        if block_residuals is None or block_residuals[i] is None:
            return tok
        return tok + block_residuals[i]

    def _check_residuals(self, block_residuals) -> None:
        if block_residuals is not None and len(block_residuals) != len(self.blocks):
            raise ValueError(f"block_residuals has {len(block_residuals)} entries; pass one per block "
                             f"({len(self.blocks)}), None for blocks without a residual")

    def _time(self, t, x: torch.Tensor) -> torch.Tensor:
        """Embed the float time signal; a scalar t is broadcast to the batch: -> (B, D)."""
        t = torch.as_tensor(t, device=x.device)
        return self.t_embedder(t.expand(x.shape[0]) if t.ndim == 0 else t)

    def embed(self, x: torch.Tensor):
        """Patchify + add positions: (B,C,H,W) -> tokens (B, h*w, D), h, w."""
        p = self.patch_size
        assert x.shape[-2] % p == 0 and x.shape[-1] % p == 0, f"H, W must be divisible by patch size {p}"
        tok = rearrange(self.x_embedder(x), "b d h w -> b (h w) d")  # (B, N, D)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        g = self.input_size // p
        pos = self.pos_embed if (h, w) == (g, g) else sincos_pos_embed_2d(self.hidden_size, h, w)[None].to(tok.device)
        return tok + pos.to(tok.dtype), h, w

    def unpatchify(self, tok: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
        return rearrange(tok, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=self.patch_size, q=self.patch_size)

    def _init_base(self) -> None:
        """DiT init: xavier-uniform linears (and flattened patch conv), zero biases, N(0, 0.02) time MLP."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    @staticmethod
    def _zero(linear: nn.Linear) -> None:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


class DiT(PatchTransformer):
    """Class-conditional Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023)."""

    @register_to_config
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, qk_norm: bool = False,
                 frequency_embedding_size: int = 256):
        out_channels = in_channels * 2 if learn_sigma else in_channels
        super().__init__(input_size, patch_size, in_channels, hidden_size, out_channels, frequency_embedding_size)
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        # num_classes == 0 -> unconditional model without label embedder
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init (Sec. 3.2): xavier linears, N(0,0.02) embeddings, adaLN-Zero: block modulation and final layer zero."""
        self._init_base()
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            self._zero(block.adaLN_modulation[-1])  # gates = 0 -> every block starts as the identity
        self._zero(self.final_layer.adaLN_modulation[-1])
        self._zero(self.final_layer.linear)  # model output starts at exactly 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, block_residuals=None) -> torch.Tensor:
        """x (B,C,H,W), t (B,) float time signal, y (B,) long labels (None -> null class) -> (B,C_out,H,W).

        block_residuals: optional list (one per block, None to skip) of (B,N,D) tensors added to the tokens after
        each block (ControlNet)."""
        self._check_residuals(block_residuals)
        tok, h, w = self.embed(x)  # (B,N,D)
        c = self._time(t, x)  # (B,D)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, force_drop_ids)
        for i, block in enumerate(self.blocks):
            tok = self._residual(self._block(block, tok, c), block_residuals, i)
        return self.unpatchify(self.final_layer(tok, c), h, w)  # (B,C_out,H,W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): uncond + s * (cond - uncond), one batched pass."""
        null = torch.full_like(y, self.num_classes)
        t = torch.as_tensor(t, device=x.device)
        t2 = t.repeat(2) if t.ndim else t
        cond, uncond = self(torch.cat([x, x]), t2, torch.cat([y, null])).chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        if self.learn_sigma:  # guide the prediction channels only; keep the conditional variance channels
            guided = torch.cat([guided[:, : self.in_channels], cond[:, self.in_channels:]], dim=1)
        return guided


# ----------------------------------------------------------------------------------------------- sizes
_DIT_SIZES = {  # name: (depth, hidden_size, num_heads), DiT Table 1; Tiny is for tests
    "Tiny": (2, 64, 2), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
}
DIT_MODELS = {
    f"DiT-{name}/{p}": partial(DiT, depth=d, hidden_size=hs, num_heads=nh, patch_size=p)
    for name, (d, hs, nh) in _DIT_SIZES.items() for p in (2, 4, 8)
}


def build_dit(name: str, **kwargs) -> DiT:
    """Build a DiT by name (e.g. "DiT-XL/2"); kwargs override the size config (input_size, in_channels, ...)."""
    if name not in DIT_MODELS:
        raise ValueError(f"unknown DiT model {name!r}; valid names: {', '.join(DIT_MODELS)}")
    return DIT_MODELS[name](**kwargs)
