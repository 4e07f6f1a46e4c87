"""ControlNet training data (Zhang, Rao & Agrawala 2023): (image, condition, caption) triples from local folders.

Sources (all offline):
  fill50k layout   root/prompt.json, one JSON object a line {"source": cond path, "target": image path, "prompt": ...}
  imagefolder      root/metadata.jsonl, one JSON object a line with the image ("file_name" or `image_column`),
                   condition (`conditioning_image_column`) and caption (`caption_column`) columns
  datasets         `datasets.load_dataset(name)` for locally cached / local-script datasets (optional dependency)
Items: "pixel_values" (3,R,R) in [-1, 1], "conditioning_pixel_values" (3,R,R) in [0, 1], "text", "index";
images are resized (short side -> R, bilinear) and center-cropped. Missing conditions can be computed on the fly
with Canny (controlnet.canny). Unreadable files raise a ValueError naming the file, or are skipped and counted.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion.data import read_jsonl, to_8bit

from .canny import canny

__all__ = ["ControlNetDataset", "read_fill50k", "read_imagefolder", "HFRows", "build_rows", "collate",
           "load_rgb", "resize_center_crop", "CONDITIONING_MODES"]

CONDITIONING_MODES = ("auto", "dataset", "canny")


# ----------------------------------------------------------------------------------------------- images
def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, dict):
        return str(src.get("path") or "<image bytes>")
    return f"<{type(src).__name__}>"


def load_rgb(src, root: Optional[Path] = None):
    """PIL RGB image from a path (relative to `root`), PIL image, HF {"bytes", "path"} dict or HxWx3 array."""
    from PIL import Image

    if isinstance(src, Image.Image):
        img = src
        img.load()
    elif isinstance(src, (str, os.PathLike)) or (isinstance(src, dict) and not src.get("bytes")):
        path = Path(src["path"] if isinstance(src, dict) else src)
        if root is not None and not path.is_absolute():
            path = root / path
        with Image.open(path) as im:
            im.load()
            img = im.copy() if im.mode == "RGB" else to_8bit(im).convert("RGB")
    elif isinstance(src, dict):
        img = Image.open(io.BytesIO(src["bytes"]))
        img.load()
    elif isinstance(src, np.ndarray):
        img = Image.fromarray(src)
    else:
        raise TypeError(f"cannot read an image from {type(src).__name__}")
    return img if img.mode == "RGB" else to_8bit(img).convert("RGB")  # gray/RGBA/16-bit -> RGB (alpha dropped)


def resize_center_crop(img, size: int):
    """Short side to `size` (bilinear, antialiased by PIL), then the central size x size crop."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)


# ----------------------------------------------------------------------------------------------- row sources
def _records(path: Path) -> list[tuple[int, dict]]:
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


def read_fill50k(root) -> list[dict]:
    """Rows {"image", "conditioning_image", "text"} (absolute paths) of the fill50k layout (root/prompt.json)."""
    root = Path(root).resolve()
    path = root / "prompt.json"
    rows = []
    for n, rec in _records(path):
        missing = [k for k in ("source", "target", "prompt") if k not in rec]
        if missing:
            raise ValueError(f"{path}:{n}: record lacks {missing} (fill50k lines are "
                             f'{{"source": ..., "target": ..., "prompt": ...}})')
        rows.append({"image": root / rec["target"], "conditioning_image": root / rec["source"], "text": rec["prompt"]})
    return rows


def read_imagefolder(root, image_column: str = "image", conditioning_image_column: str = "conditioning_image",
                     caption_column: str = "text") -> list[dict]:
    """Rows of a Hugging Face imagefolder (root/metadata.jsonl), absolute paths; the image column may be "file_name"."""
    root = Path(root).resolve()
    path = root / "metadata.jsonl"
    recs = [rec for _, rec in _records(path)]
    cols = set(recs[0])
    img_col = image_column if image_column in cols else "file_name" if "file_name" in cols else None
    if img_col is None:
        raise ValueError(f"{path}: no image column {image_column!r} (nor 'file_name'); columns: {sorted(cols)}. "
                         f"Set --image_column")
    if caption_column not in cols:
        raise ValueError(f"{path}: no caption column {caption_column!r}; columns: {sorted(cols)}. Set --caption_column")
    has_cond = conditioning_image_column in cols
    return [{"image": root / r[img_col], "text": r[caption_column],
             "conditioning_image": root / r[conditioning_image_column] if has_cond else None} for r in recs]


class HFRows:
    """A `datasets.Dataset` viewed as rows {"image", "conditioning_image", "text"} (columns renamed)."""

    def __init__(self, ds, image_column="image", conditioning_image_column="conditioning_image",
                 caption_column="text", root: Optional[Path] = None):
        cols = list(ds.column_names)
        for col, flag in ((image_column, "image_column"), (caption_column, "caption_column")):
            if col not in cols:
                raise ValueError(f"dataset has no column {col!r}; columns: {cols}. Set --{flag}")
        self.ds, self.root = ds, root
        self.cols = (image_column, conditioning_image_column if conditioning_image_column in cols else None,
                     caption_column)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        rec = self.ds[int(i)]
        img, cond, text = self.cols
        return {"image": rec[img], "conditioning_image": rec[cond] if cond else None, "text": rec[text]}


def _load_hf(name: str, config_name=None, cache_dir=None, split: str = "train"):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--dataset_name {name!r} needs the optional 'datasets' package (pip install datasets); "
                         f"or point --train_data_dir at a local imagefolder / fill50k directory") from None
    try:
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir, split=split)
    except Exception as e:
        raise ValueError(f"datasets.load_dataset({name!r}) failed ({type(e).__name__}: {e}); only local or already "
                         f"cached datasets can be used offline") from None


def build_rows(train_data_dir=None, dataset_name=None, dataset_config_name=None, cache_dir=None,
               image_column="image", conditioning_image_column="conditioning_image", caption_column="text"):
    """Rows and their root from a local folder (fill50k or imagefolder layout) or a `datasets` dataset."""
    cols = dict(image_column=image_column, conditioning_image_column=conditioning_image_column,
                caption_column=caption_column)
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("give exactly one of --train_data_dir (a local folder) or --dataset_name")
    if train_data_dir is not None:
        root = Path(train_data_dir)
        if not root.is_dir():
            raise ValueError(f"--train_data_dir {root} is not a directory")
        if (root / "prompt.json").is_file():
            return read_fill50k(root), root
        if (root / "metadata.jsonl").is_file():
            return read_imagefolder(root, **cols), root
        raise ValueError(f"{root} has neither prompt.json (fill50k layout) nor metadata.jsonl (imagefolder layout)")
    root = Path(dataset_name).resolve() if Path(dataset_name).is_dir() else None
    return HFRows(_load_hf(dataset_name, dataset_config_name, cache_dir), root=root, **cols), root


# ----------------------------------------------------------------------------------------------- dataset
class ControlNetDataset(Dataset):
    """(image, condition, caption) items at a fixed square resolution; see the module docstring."""

    def __init__(self, rows: Sequence[dict], resolution: int, root: Optional[Path] = None, conditioning: str = "auto",
                 skip_bad_images: bool = False, canny_low: int = 100, canny_high: int = 200,
                 max_samples: Optional[int] = None):
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {list(CONDITIONING_MODES)}, got {conditioning!r}")
        self.rows, self.root, self.resolution = rows, root, int(resolution)
        self.canny_thresholds = (canny_low, canny_high)
        n = len(rows) if max_samples is None else min(len(rows), int(max_samples))
        has_cond = n > 0 and rows[0].get("conditioning_image") is not None
        if conditioning == "auto":
            conditioning = "dataset" if has_cond else "canny"
        elif conditioning == "dataset" and not has_cond:
            raise ValueError("the data has no conditioning images (check --conditioning_image_column); "
                             "pass --conditioning canny to compute Canny edge conditions on the fly")
        self.conditioning = conditioning
        self.indices = list(range(n))
        self.skipped: list[tuple[int, str, str]] = []  # (row, file, reason)
        if skip_bad_images:
            self.indices = [i for i in self.indices if self._readable(i)]
        if not self.indices:
            raise ValueError(f"no usable samples ({len(self.skipped)} skipped as unreadable)")

    def _sources(self, i: int):
        row = self.rows[i]
        return [row["image"]] + ([row["conditioning_image"]] if self.conditioning == "dataset" else [])

    def _readable(self, i: int) -> bool:
        for src in self._sources(i):
            try:
                load_rgb(src, self.root)
            except Exception as e:  # PIL raises many types for broken files
                self.skipped.append((i, _describe(src), f"{type(e).__name__}: {e}"))
                return False
        return True

    def _load(self, src):
        try:
            return resize_center_crop(load_rgb(src, self.root), self.resolution)
        except Exception as e:
            raise ValueError(f"cannot read image {_describe(src)} ({type(e).__name__}: {e}); fix or remove it, "
                             f"or pass --skip_bad_images to skip unreadable samples") from None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        row = self.rows[i]
        image = self._load(row["image"])
        if self.conditioning == "canny":
            cond = torch.from_numpy(canny(np.asarray(image), *self.canny_thresholds).transpose(2, 0, 1) / 255.0)
            cond = cond.float()
        else:
            cond = _to_tensor(self._load(row["conditioning_image"]))
        text = row["text"]
        if isinstance(text, (list, tuple)):  # several captions: the first (deterministic)
            text = text[0] if text else ""
        if not isinstance(text, str):
            raise ValueError(f"caption of sample {i} is {type(text).__name__}, not text; check --caption_column")
        return {"pixel_values": _to_tensor(image) * 2 - 1, "conditioning_pixel_values": cond, "text": text,
                "index": i}


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep captions and indices as lists."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "conditioning_pixel_values": torch.stack([it["conditioning_pixel_values"] for it in items]),
            "text": [it["text"] for it in items], "index": [it["index"] for it in items]}
