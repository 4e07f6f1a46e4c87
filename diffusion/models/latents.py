"""Latent space as in SD3 (Esser et al. 2024, Sec. 5.2.1): a diffusers AutoencoderKL from a local
directory, latents = (z - shift_factor) * scaling_factor (SD3's 16-channel VAE: 1.5305 / 0.0609).

The cache holds each image's VAE posterior N(mean, std^2) (normalized), encoded once; every training
draw is a fresh posterior sample z = mean + std * eps with the loop's generator (sample_latents), as
SD / SD3 trainers sample latent_dist each step (diffusers' --cache_latents keeps the latent_dist and
calls .sample() per step), not the posterior mode.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["VAEScaling", "VAECodec", "cache_latents", "LatentDataset", "sample_latents"]

CACHE_FORMAT = "posterior-v2"  # tensors latents (posterior mean) + latent_std; older caches are rebuilt


@dataclass(frozen=True)
class VAEScaling:
    """VAE posterior z <-> the network's latents: latents = (z - shift) * scale, z = latents / scale + shift
    (Rombach et al. 2022, Sec. 4.3.2: scale; Esser et al. 2024, Sec. 5.2.1: shift; SD: 0.18215 / 0, SD3:
    1.5305 / 0.0609)."""

    scale: float
    shift: float = 0.0

    @classmethod
    def of(cls, vae) -> "VAEScaling":
        """The scaling_factor and shift_factor of an AutoencoderKL or its config (SD1/2/XL VAEs have no shift)."""
        cfg = getattr(vae, "config", vae)
        return cls(float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0))

    def normalize(self, z):
        """VAE latents z -> network latents (z - shift) * scale."""
        return (z - self.shift) * self.scale

    def denormalize(self, latents):
        """Network latents -> VAE latents latents / scale + shift."""
        return latents / self.scale + self.shift


class VAECodec:
    """Pixels in [-1, 1] <-> normalized latents with the VAE's scaling_factor and shift_factor (VAEScaling)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling = VAEScaling.of(cfg)
        self.scaling_factor, self.shift_factor = self.scaling.scale, self.scaling.shift
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "VAECodec":
        """Load AutoencoderKL from a local VAE directory or a pipeline directory holding vae/."""
        from diffusers import AutoencoderKL

        path = Path(path)
        if (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise ValueError(f"no diffusers VAE at {path}: expected a directory with config.json and weights "
                             f"(an AutoencoderKL saved with save_pretrained, or a pipeline directory with vae/)")
        return cls(AutoencoderKL.from_pretrained(path, torch_dtype=dtype).to(device))

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @property
    def dtype(self):
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, c, H/f, W/f) normalized latents (posterior mean unless a
        generator is given, then a posterior sample)."""
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator)
        return self.scaling.normalize(z).float()

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) in [-1, 1] -> the normalized posterior (mean, std), each (B, c, H/f, W/f):
        z = mean + std * eps is (vae_z - shift_factor) * scaling_factor for vae_z ~ latent_dist."""
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return self.scaling.normalize(dist.mean.float()), dist.std.float() * self.scaling.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> images in [-1, 1]."""
        z = self.scaling.denormalize(latents.to(self.device, self.dtype))
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def fingerprint(self) -> str:
        """Hash of the VAE config and weights: a cache written by another VAE is not reused."""
        h = hashlib.sha1(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        for name, t in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def cache_latents(dataset: Dataset, codec: VAECodec, path, key: str = "", batch_size: int = 32,
                  progress: bool = False, main_process: bool = True) -> "LatentDataset":
    """Encode every dataset["x"] once into `path` (safetensors: latents = posterior mean, latent_std,
    labels; texts in metadata); draw training latents from it with sample_latents. An existing cache is reused when its VAE fingerprint, `key` (describe the dataset) and length
    match; otherwise it is rebuilt. Written atomically (temp file + os.replace)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    path = Path(path)
    stamp = hashlib.sha1(f"{CACHE_FORMAT}|{codec.fingerprint()}|{key}|{len(dataset)}".encode()).hexdigest()
    if LatentDataset.stamp_of(path) == stamp:
        return LatentDataset(path)
    if not main_process:
        raise RuntimeError(f"latent cache {path} is missing or stale; build it on the main process first")
    means, stds, labels, texts = [], [], [], []
    for lo in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", disable=not progress):
        items = [dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))]
        mean, std = codec.posterior(torch.stack([it["x"] for it in items]))
        means.append(mean.cpu())
        stds.append(std.cpu())
        labels += [it["label"] for it in items if "label" in it]
        texts += [it["text"] for it in items if "text" in it]
    tensors = {"latents": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous()}
    if labels:
        tensors["labels"] = torch.tensor(labels, dtype=torch.long)
    meta = {"stamp": stamp, "key": key, "scaling_factor": str(codec.scaling_factor),
            "shift_factor": str(codec.shift_factor)}
    if texts:
        meta["texts"] = json.dumps(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return LatentDataset(path)


class LatentDataset(Dataset):
    """Cached posteriors as a dataset: {"x": posterior mean, "x_std": posterior std, "label" | "text"};
    train on sample_latents(batch, generator), not on "x" (the mode)."""

    def __init__(self, path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.path = Path(path)
        tensors = load_file(str(self.path))
        with safe_open(str(self.path), "pt") as f:
            self.metadata = f.metadata() or {}
        self.latents = tensors["latents"]
        if "latent_std" not in tensors:
            raise ValueError(f"{self.path} is a latent cache without posterior std (an older format): delete it "
                             f"and it is rebuilt from the data")
        self.stds = tensors["latent_std"]
        self.labels = tensors.get("labels")
        self.texts = json.loads(self.metadata["texts"]) if "texts" in self.metadata else None

    @staticmethod
    def stamp_of(path) -> str | None:
        from safetensors import safe_open

        if not Path(path).is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("stamp")
        except Exception:  # unreadable / truncated cache: rebuild
            return None

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        item = {"x": self.latents[i], "x_std": self.stds[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.texts is not None:
            item["text"] = self.texts[i]
        return item


def sample_latents(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh posterior sample x + x_std * eps of a LatentDataset batch (eps from `generator`, the
    training loop's per-step one); a batch without "x_std" (pixels, no VAE) is returned as is."""
    x = batch["x"]
    if "x_std" not in batch:
        return x
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + batch["x_std"] * eps.to(x.device)
