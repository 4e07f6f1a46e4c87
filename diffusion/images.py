"""Image I/O shared by the pipelines, cn-sample, the datasets and the scripts: one reader, one uint8 conversion,
one grid.

read_image turns a file, PIL image, HF {"bytes", "path"} dict or array into an upright 8-bit RGB (or L) PIL image:
EXIF orientation applied; 16-bit, 32-bit integer and float samples scaled to 8 bits (to_8bit; PIL's own convert
clips them); palette and alpha images converted with the alpha dropped; files over PIL.Image.MAX_IMAGE_PIXELS refused
with a DecompressionBombError naming the limit (PIL itself only warns up to twice the limit).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["read_image", "to_8bit", "to_uint8", "to_pil", "image_grid"]


def to_8bit(im):
    """PIL image with 16/32-bit integer or 32-bit float samples -> 8-bit L; other modes unchanged. PIL's own
    convert("L"/"RGB") clips those values at 255 (16-bit: all white; float in [0, 1]: black).
    16-bit (I;16*): x 255/65535. 32-bit integer (I): values within [0, 255] as they are, within [0, 65535] as
    16-bit, otherwise the actual min..max -> 0..255. Float (F): [0, 1] -> x 255, otherwise the actual min..max
    -> 0..255 (e.g. a depth map in metres); NaN / Inf samples raise a ValueError."""
    from PIL import Image

    if not (im.mode in ("I", "F") or im.mode.startswith("I;16")):
        return im
    a = np.asarray(im, dtype=np.float64)
    lo, scale = 0.0, 255 / 65535
    if not im.mode.startswith("I;16") and a.size:
        if not np.isfinite(a).all():
            raise ValueError(f"image has NaN/Inf samples ({im.mode} mode); write finite values")
        a_min, a_max = float(a.min()), float(a.max())
        if im.mode == "F" and 0 <= a_min and a_max <= 1:
            scale = 255.0
        elif im.mode == "I" and 0 <= a_min and a_max <= 255:
            scale = 1.0
        elif im.mode == "I" and 0 <= a_min and a_max <= 65535:
            pass
        elif a_max > a_min:
            lo, scale = a_min, 255 / (a_max - a_min)
        else:  # constant outside the ranges above
            scale = 1.0
    return Image.fromarray(np.clip((a - lo) * scale, 0, 255).round().astype(np.uint8), "L")


def _open(fp, name: str):
    """Image.open + load, refusing images over PIL.Image.MAX_IMAGE_PIXELS (PIL warns up to twice the limit)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Image.DecompressionBombError(
                f"{name}: {e} If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS (now "
                f"{Image.MAX_IMAGE_PIXELS}) before reading it.") from None
    im.load()
    return im


def read_image(src, root: Optional[Path] = None, mode: str = "RGB"):
    """Upright 8-bit PIL image in `mode` ("RGB" or "L") from a path (relative to `root`), PIL image, HF
    {"bytes", "path"} dict or array (uint8, uint16, float). See the module docstring for what is converted."""
    from PIL import Image, ImageOps

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if isinstance(src, Image.Image):
        src.load()
        img = ImageOps.exif_transpose(src)  # a copy, rotated / flipped as the camera meant
    elif isinstance(src, (str, os.PathLike)) or (isinstance(src, dict) and not src.get("bytes")):
        path = Path(src["path"] if isinstance(src, dict) else src)
        if root is not None and not path.is_absolute():
            path = root / path
        with _open(path, os.fspath(path)) as im:
            img = ImageOps.exif_transpose(im)
    elif isinstance(src, dict):
        with _open(io.BytesIO(src["bytes"]), str(src.get("path") or "<image bytes>")) as im:
            img = ImageOps.exif_transpose(im)
    elif isinstance(src, np.ndarray):
        img = Image.fromarray(src)
    else:
        raise TypeError(f"cannot read an image from {type(src).__name__}; pass a path, PIL image, array or "
                        f"{{'bytes', 'path'}} dict")
    if img.mode == mode:
        return img
    img = to_8bit(img)
    if img.mode == "P":  # palette transparency is dropped like alpha, without PIL's palette-transparency warning
        img = img.convert("RGBA")
    return img.convert(mode)  # gray / RGBA / palette / CMYK -> mode (alpha dropped)


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (array or tensor, any shape) -> uint8 0..255, clipped and rounded."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def to_pil(images) -> list:
    """(B,3,H,W) tensor in [0,1] -> list of PIL RGB images."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images.permute(0, 2, 3, 1))]


def image_grid(rows: Sequence[Sequence], pad: int = 2, border: int = 0) -> np.ndarray:
    """HxWx3 uint8 grid of equally sized tiles (HxWx3 / HxWx4 / HxW uint8 arrays or PIL images), one list per row
    (missing tiles of short rows stay white); `pad` white pixels between tiles, `border` around the grid."""
    tiles = [[np.asarray(t) for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = max(len(r) for r in tiles)
    grid = np.full((len(tiles) * (h + pad) - pad + 2 * border, ncol * (w + pad) - pad + 2 * border, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                raise ValueError(f"grid tiles must share one size: tile ({i}, {j}) is {tile.shape[:2]}, not {(h, w)}")
            tile = tile[..., None] if tile.ndim == 2 else tile
            y, x = border + i * (h + pad), border + j * (w + pad)
            grid[y:y + h, x:x + w] = tile[..., :3]  # gray broadcasts to 3 channels, alpha dropped
    return grid
