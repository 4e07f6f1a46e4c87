"""Tiny SD1.5-, SD2- and SDXL-shaped UNet configs for fast ControlNet tests (Zhang, Rao & Agrawala 2023)."""
import torch
from diffusers import UNet2DConditionModel

SD15 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
SD2 = dict(SD15, attention_head_dim=(2, 4), use_linear_projection=True,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(SD15, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
CONFIGS = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL}


def make_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**CONFIGS[name]).eval()
    # Randomise every parameter so that zero-initialised UNet layers cannot hide errors.
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


def make_inputs(name: str, batch: int = 2, latent: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(sample=torch.randn(batch, 4, latent, latent, generator=g),
              timestep=torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
              encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
              controlnet_cond=torch.rand(batch, 3, latent * 8, latent * 8, generator=g))
    if name == "sdxl":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 16, generator=g),
                                       time_ids=torch.randn(batch, 6, generator=g) * 100)
    return kw


def randomize(module, seed: int = 0, std: float = 0.05):
    """Random values everywhere, zero convs included, so parity tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def unet_inputs(inp):
    return dict(sample=inp["sample"], timestep=inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"],
                added_cond_kwargs=inp.get("added_cond_kwargs"))


def assert_residuals_close(a, b, atol=1e-6):
    (da, ma), (db, mb) = a, b
    assert len(da) == len(db)
    for x, y in zip(da, db):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    torch.testing.assert_close(ma, mb, atol=atol, rtol=0)
