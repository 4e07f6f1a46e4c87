"""Key mapping between the original ControlNet checkpoints (ldm/cldm ``control_model.*``, Zhang et al. 2023) and ours."""
from __future__ import annotations

from .config import ControlNetConfig

ORIGINAL_PREFIX = "control_model."

# ldm ResBlock sub-module -> diffusers ResnetBlock2D sub-module.
_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _resnet(orig: str, ours: str) -> list:
    return [(f"{orig}.{a}", f"{ours}.{b}") for a, b in _RESNET]


def module_map(config: ControlNetConfig) -> dict:
    """{original module prefix: diffusers module prefix} for every parameterised module of ``config``."""
    c = config
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
             ("input_blocks.0.0", "conv_in")]
    # ldm puts every extra vector embedding in label_emb (SDXL: Sequential(Linear, SiLU, Linear)).
    if c.addition_embed_type == "text_time":
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    elif c.class_embed_type in ("timestep", "projection"):
        pairs += [("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2")]
    elif c.class_embed_type is None and c.num_class_embeds is not None:
        pairs += [("label_emb", "class_embedding")]

    # Hint encoder: Sequential(conv, SiLU, conv, SiLU, ...) -> conv at every even index.
    n_mid = 2 * (len(c.conditioning_embedding_out_channels) - 1)
    pairs.append(("input_hint_block.0", "controlnet_cond_embedding.conv_in"))
    pairs += [(f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}") for k in range(n_mid)]
    pairs.append((f"input_hint_block.{2 * (n_mid + 1)}", "controlnet_cond_embedding.conv_out"))

    # Encoder: input_blocks.i are numbered like the skip tensors, and zero_convs.i follows the same numbering.
    idx, n = 1, len(c.down_block_types)
    for b, kind in enumerate(c.down_block_types):
        for layer in range(c.layers_per_block):
            pairs += _resnet(f"input_blocks.{idx}.0", f"down_blocks.{b}.resnets.{layer}")
            if kind.startswith("CrossAttn"):
                pairs.append((f"input_blocks.{idx}.1", f"down_blocks.{b}.attentions.{layer}"))
            idx += 1
        if b < n - 1:
            pairs.append((f"input_blocks.{idx}.0.op", f"down_blocks.{b}.downsamplers.0.conv"))
            idx += 1
    pairs += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(idx)]

    pairs += _resnet("middle_block.0", "mid_block.resnets.0")
    if c.mid_block_type == "UNetMidBlock2DCrossAttn":
        pairs.append(("middle_block.1", "mid_block.attentions.0"))
        pairs += _resnet("middle_block.2", "mid_block.resnets.1")
    pairs.append(("middle_block_out.0", "controlnet_mid_block"))
    return dict(pairs)


def _rename(key: str, table: dict) -> str:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest module prefix wins
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return key  # unknown keys pass through and are reported by the strict loader


def is_original_layout(sd: dict) -> bool:
    return any(k.startswith(ORIGINAL_PREFIX) for k in sd) or "input_hint_block.0.weight" in sd


def original_to_diffusers(sd: dict, config: ControlNetConfig) -> dict:
    """Rename an original-layout state dict; with a ``control_model.`` prefix, other entries (a bundled SD model,
    VAE, text encoder) are dropped."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        sd = {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if k.startswith(ORIGINAL_PREFIX)}
    table = module_map(config)
    return {_rename(k, table): v for k, v in sd.items()}


def diffusers_to_original(sd: dict, config: ControlNetConfig, prefix: str = ORIGINAL_PREFIX) -> dict:
    """Inverse of :func:`original_to_diffusers` (used to write / test the original layout)."""
    table = {ours: orig for orig, ours in module_map(config).items()}
    return {prefix + _rename(k, table): v for k, v in sd.items()}
