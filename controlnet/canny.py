"""Canny edge conditions and an edge-F1 fidelity metric for ControlNet (Zhang, Rao & Agrawala 2023)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import cv2
import numpy as np


def _read(image) -> np.ndarray:
    """HxWx3 uint8 RGB of a path or PIL image through the one reader (diffusion.images.read_image)."""
    from PIL import Image

    from diffusion.images import read_image

    if not isinstance(image, (str, os.PathLike)):
        return np.asarray(read_image(image))
    try:
        return np.asarray(read_image(image))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, unreadable, too large
        raise ValueError(f"cannot read image file {os.fspath(image)!r} ({type(e).__name__}: {e})") from None


def to_gray_uint8(image) -> np.ndarray:
    """HxW uint8 luminance of a path, PIL image or array (gray/RGB/RGBA, uint8/uint16/float in [0,1]/bool).

    Paths and PIL images are read by diffusion.images.read_image (EXIF orientation, 16-bit / float scaling,
    palette); RGB(A) arrays are taken in RGB order; alpha is ignored.
    """
    if isinstance(image, (str, os.PathLike)) or (hasattr(image, "mode") and hasattr(image, "getbands")):
        arr = _read(image)  # PIL.Image recognised without importing PIL
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)  # 65535 -> 255, x*257 -> x
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"integer image of dtype {arr.dtype} has values outside [0, 255]")
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(arr)


def canny(image, low: int = 100, high: int = 200, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Canny edge condition, HxWx3 uint8 in {0, 255}; ``size=(H, W)`` resizes the image before detection."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    gray = to_gray_uint8(image)
    if size is not None:
        h, w = int(size[0]), int(size[1])
        if (h, w) != gray.shape:
            shrink = h * w < gray.shape[0] * gray.shape[1]
            gray = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    edges = cv2.Canny(gray, low, high)
    return np.repeat(edges[..., None], 3, axis=2)


def _edge_mask(edges) -> np.ndarray:
    e = np.asarray(edges)
    if e.ndim == 3:
        e = e.max(axis=2)
    return e > 0


def edge_f1(condition_edges, generated_image, tolerance: int = 2, low: int = 100, high: int = 200) -> float:
    """F1 between condition edges and Canny(generated image), matches allowed within ``tolerance`` px.

    precision = generated edge pixels within ``tolerance`` (Chebyshev distance) of a condition edge / all
    generated edge pixels; recall the other way round. Two empty edge maps score 1, one empty map scores 0.
    """
    cond = _edge_mask(condition_edges)
    gen = _edge_mask(canny(generated_image, low, high, size=cond.shape))
    n_cond, n_gen = int(cond.sum()), int(gen.sum())
    if n_cond == 0 or n_gen == 0:
        return 1.0 if n_cond == n_gen else 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_cond = cv2.dilate(cond.astype(np.uint8), kernel) > 0
    near_gen = cv2.dilate(gen.astype(np.uint8), kernel) > 0
    precision = float((gen & near_cond).sum()) / n_gen
    recall = float((cond & near_gen).sum()) / n_cond
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
