"""Networks and adapters, schedule-free: DiT, MM-DiT, the text encoder, VAE latents, the SD3 backbone adapter.

They map (x, t, conditions) to a tensor and know nothing about noise; nothing here imports the schedule."""
from .dit import DIT_MODELS, DiT, build_dit
from .latents import LatentDataset, VAECodec, cache_latents, sample_latents
from .mmdit import MMDIT_MODELS, MMDiT, build_mmdit
from .pretrained import PretrainedModel, load_pretrained
from .sd3_backbone import SD3Backbone
from .text_encoder import TextEncoder

__all__ = ["DIT_MODELS", "DiT", "build_dit", "MMDIT_MODELS", "MMDiT", "build_mmdit", "LatentDataset", "VAECodec",
           "cache_latents", "sample_latents", "SD3Backbone", "TextEncoder", "PretrainedModel", "load_pretrained"]
