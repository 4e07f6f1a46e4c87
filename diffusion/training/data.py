"""Offline datasets for the trainers (no downloads).

Every dataset yields dicts {"x": (C,H,W) float in [-1, 1], "label": int} or {"x": ..., "text": str}:
  DigitsDataset        scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), upsampled
  ImageFolderDataset   your images, optional metadata.jsonl ({"file_name", "text" | "label"}) or class folders
  ShapesDataset        procedural colored shapes with captions ("red circle on blue background")
The text encoder they pair with lives in diffusion.models.text_encoder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..images import read_image, to_8bit  # noqa: F401  (to_8bit: re-exported)

__all__ = ["DigitsDataset", "ImageFolderDataset", "ShapesDataset", "EpochBatchSampler", "TextEncoder",
           "load_digits_images", "to_8bit", "IMAGE_EXTENSIONS", "COLORS", "SHAPES"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------- digits
def load_digits_images(size: int = 16, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as (N, 1, size, size) in [-1, 1] (bilinear upsampling) and labels (N,).
    split: "train" (1437 images), "test" (every 5th image, 360) or "all" (1797)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if size < 8:
        raise ValueError(f"digits are 8x8; size must be >= 8, got {size}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # (N,1,8,8), values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    keep = torch.arange(len(y)) % 5 == 0
    if split == "train":
        keep = ~keep
    elif split == "all":
        keep = torch.ones_like(keep)
    return x[keep].contiguous(), y[keep].contiguous()


class DigitsDataset(Dataset):
    """Class-conditional handwritten digits (sklearn.datasets.load_digits) at size x size."""

    num_classes, channels = 10, 1

    def __init__(self, size: int = 16, split: str = "train"):
        self.images, self.labels = load_digits_images(size, split)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.images[i], "label": int(self.labels[i])}


# ----------------------------------------------------------------------------------------------- image folder
def _load_image(path: Path, size: int | None, channels: int) -> torch.Tensor:
    """Read (diffusion.images.read_image), resize the short side to `size`, center-crop, scale to [-1, 1]."""
    from PIL import Image

    try:
        im = read_image(path, mode="L" if channels == 1 else "RGB")
        if size is not None:
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.float32)
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a / 127.5 - 1.0)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSON-lines file; bad lines (also invalid UTF-8) raise
    naming file:line."""
    rows = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save "
                             f"the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object, got {line.strip()[:80]!r}")
        rows.append((n, rec))
    return rows


class ImageFolderDataset(Dataset):
    """Images under `root`. With root/metadata.jsonl (one JSON object per line: "file_name" and "text"
    or "label") those entries are used; otherwise every image, with class labels taken from
    first-level subfolders when there are any."""

    def __init__(self, root, size: int | None = 32, channels: int = 3, metadata: str = "metadata.jsonl"):
        self.root, self.size, self.channels = Path(root), size, channels
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        meta = self.root / metadata
        self.texts = self.labels = None
        self.class_names: list[str] = []
        if meta.is_file():
            self.files, texts, labels = self._read_metadata(meta)
            if any(t is not None for t in texts):
                if any(t is None for t in texts):
                    raise ValueError(f"{meta}: give every line a 'text' (or none of them)")
                self.texts = texts
            elif any(lab is not None for lab in labels):
                if any(lab is None for lab in labels):
                    raise ValueError(f"{meta}: give every line a 'label' (or none of them)")
                self._set_labels(labels)
        else:
            self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            parents = [p.parent for p in self.files]
            if self.files and all(p != self.root for p in parents):
                self._set_labels([p.relative_to(self.root).parts[0] for p in parents])
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")

    def _read_metadata(self, meta: Path):
        files, texts, labels = [], [], []
        for n, rec in read_jsonl(meta):
            if "file_name" not in rec:
                raise ValueError(f"{meta}:{n}: each line needs a 'file_name' key, got {json.dumps(rec)[:80]!r}")
            path = self.root / rec["file_name"]
            if not path.is_file():
                raise ValueError(f"{meta}:{n}: image {path} listed in metadata does not exist")
            files.append(path)
            texts.append(rec.get("text"))
            labels.append(rec.get("label"))
        return files, texts, labels

    def _set_labels(self, labels):
        if all(isinstance(lab, int) and not isinstance(lab, bool) for lab in labels):
            self.labels = list(labels)
            self.class_names = [str(i) for i in range(max(labels) + 1)]
        else:
            self.class_names = sorted({str(lab) for lab in labels})
            index = {c: i for i, c in enumerate(self.class_names)}
            self.labels = [index[str(lab)] for lab in labels]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        item = {"x": _load_image(self.files[i], self.size, self.channels)}
        if self.texts is not None:
            item["text"] = self.texts[i]
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


# ----------------------------------------------------------------------------------------------- shapes
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 215, 40),
          "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage of a shape (ss x ss supersampling): (size, size) in [0, 1]."""
    g = (np.arange(size * ss) + 0.5) / ss
    x, y = np.meshgrid(g, g)
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    elif shape == "square":
        m = (np.abs(x - cx) <= 0.85 * r) & (np.abs(y - cy) <= 0.85 * r)
    else:  # upward triangle with apex at (cx, cy - r), base at y = cy + r
        m = (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) * 0.5 * math.sqrt(3) / 1.5)
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


class ShapesDataset(Dataset):
    """Procedural captioned images: "<color> <shape> on <color> background", deterministic from seed."""

    channels = 3

    def __init__(self, n: int = 2000, size: int = 16, seed: int = 0, colors=None, shapes=SHAPES):
        colors = list(colors or COLORS)
        bad = [c for c in colors if c not in COLORS] + [s for s in shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"unknown colors/shapes {bad}; valid colors: {list(COLORS)}, shapes: {list(SHAPES)}")
        rng = np.random.default_rng(seed)
        self.size, self.texts = size, []
        images = np.empty((n, 3, size, size), dtype=np.float32)
        for i in range(n):
            fg, bg = rng.choice(len(colors), 2, replace=False)
            shape = shapes[rng.integers(len(shapes))]
            r = size * rng.uniform(0.22, 0.34)
            cx, cy = size * rng.uniform(0.35, 0.65, 2)
            m = _shape_mask(shape, size, cx, cy, r)[None]
            c_fg = np.array(COLORS[colors[fg]], np.float32)[:, None, None]
            c_bg = np.array(COLORS[colors[bg]], np.float32)[:, None, None]
            images[i] = (m * c_fg + (1 - m) * c_bg) / 127.5 - 1
            self.texts.append(f"{colors[fg]} {shape} on {colors[bg]} background")
        self.images = torch.from_numpy(images)

    @staticmethod
    def vocabulary() -> list[str]:
        return sorted(set(COLORS) | set(SHAPES) | {"on", "background"})

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"x": self.images[i], "text": self.texts[i]}


# ----------------------------------------------------------------------------------------------- batching
class EpochBatchSampler(torch.utils.data.Sampler):
    """Seeded, resumable batches: epoch e is a permutation drawn from (seed, e); this process takes
    its slice of every global batch (drop_last). start_batch skips batches of the current epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"dataset of {n} items is smaller than one global batch "
                             f"({batch_size} x {world_size} processes); lower batch_size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.n // (self.batch_size * self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world
        for b in range(self.start_batch, len(self)):
            lo = b * gb + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size]
