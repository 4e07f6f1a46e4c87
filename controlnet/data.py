"""ControlNet training data (Zhang, Rao & Agrawala 2023): (image, condition, caption) triples from local files.

Sources (all offline):
  fill50k layout   root/prompt.json, one JSON object a line {"source": cond path, "target": image path, "prompt": ...}
  imagefolder      root/metadata.jsonl, one JSON object a line with the image ("file_name" or `image_column`),
                   condition (`conditioning_image_column`) and caption (`caption_column`) columns
  table files      local .json (JSON lines or an array of objects), .jsonl, .csv or .parquet files given as
                   `dataset_name` or `data_files` (diffusers' load_dataset(..., data_files=...)), the same columns;
                   image paths are relative to the file
  datasets         `datasets.load_dataset(name)` for locally cached / local-script datasets (optional dependency)
Every row is checked at start-up: a missing image / caption / condition names file:line (or the row) and the
column. Conditions come from the data; Canny edges (controlnet.canny) only with conditioning="canny".
Items: "pixel_values" (3,R,R) in [-1, 1], "conditioning_pixel_values" (3,R,R) in [0, 1], "text", "index";
images are EXIF-oriented, resized (short side -> R, bilinear) and center-cropped. Unreadable files raise a
ValueError naming the file, or are skipped and counted.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion.images import read_image
from diffusion.training.data import read_jsonl

from .canny import canny

__all__ = ["ControlNetDataset", "read_fill50k", "read_imagefolder", "read_table", "HFRows", "build_rows", "collate",
           "load_rgb", "resize_center_crop", "CONDITIONING_MODES", "TABLE_SUFFIXES"]

CONDITIONING_MODES = ("auto", "dataset", "canny")  # auto = dataset (kept for old configs); canny only when asked
TABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


# ----------------------------------------------------------------------------------------------- images
def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, dict):
        return str(src.get("path") or "<image bytes>")
    return f"<{type(src).__name__}>"


load_rgb = read_image  # PIL RGB image of a path (relative to `root`), PIL image, HF dict or array: the one reader


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
class Rows(list):
    """Rows {"image", "conditioning_image", "text", "where"} plus the source's `columns` and the column
    `names` used for each role, for error messages."""

    def __init__(self, rows=(), columns=(), names=None):
        super().__init__(rows)
        self.columns, self.names = sorted(columns), dict(names or {})


def _empty(v, role: str = "image") -> bool:
    """No value: None, or for an image path an empty string ("" is a valid, empty caption)."""
    return v is None or (role != "text" and isinstance(v, str) and not v.strip())


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where = "file:line", record) of a JSON-lines file."""
    rows = [(f"{path}:{n}", rec) for n, rec in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


def read_fill50k(root) -> Rows:
    """Rows {"image", "conditioning_image", "text"} (absolute paths) of the fill50k layout (root/prompt.json)."""
    root = Path(root).resolve()
    rows = []
    for where, rec in _records(root / "prompt.json"):
        missing = [k for k in ("source", "target", "prompt") if _empty(rec.get(k), "text" if k == "prompt" else k)]
        if missing:
            raise ValueError(f"{where}: record lacks {missing} (fill50k lines are "
                             f'{{"source": ..., "target": ..., "prompt": ...}})')
        rows.append({"image": root / rec["target"], "conditioning_image": root / rec["source"], "text": rec["prompt"],
                     "where": where})
    names = {"image": "target", "conditioning_image": "source", "text": "prompt"}
    return Rows(rows, ("source", "target", "prompt"), names)


def _rows_of(recs: list[tuple[str, dict, Path]], source, image_column="image",
             conditioning_image_column="conditioning_image", caption_column="text") -> Rows:
    """Rows from (where, record, folder of its file) with image paths relative to that folder (absolute here);
    every record must hold an image and a caption. The image column may be "file_name" (HF imagefolder)."""
    cols = set().union(*(rec for _, rec, _ in recs))
    img_col = image_column if image_column in cols else "file_name" if "file_name" in cols else None
    if img_col is None:
        raise ValueError(f"{source}: no image column {image_column!r} (nor 'file_name'); columns: {sorted(cols)}. "
                         f"Set --image_column")
    if caption_column not in cols:
        raise ValueError(f"{source}: no caption column {caption_column!r}; columns: {sorted(cols)}. "
                         f"Set --caption_column")
    rows = []
    for where, rec, root in recs:
        for col, role in ((img_col, "image"), (caption_column, "caption")):
            if _empty(rec.get(col), "text" if role == "caption" else role):
                raise ValueError(f"{where}: record lacks the {role} column {col!r} (or it has no value); "
                                 f"fix or remove the line")
        cond = rec.get(conditioning_image_column)
        rows.append({"image": _path_or_image(rec[img_col], root), "text": rec[caption_column], "where": where,
                     "conditioning_image": None if _empty(cond) else _path_or_image(cond, root)})
    names = {"image": img_col, "conditioning_image": conditioning_image_column, "text": caption_column}
    return Rows(rows, cols, names)


def _path_or_image(v, root: Path):
    """A path string relative to `root` (the file's folder) -> absolute; image bytes / dicts as they are."""
    return root / v if isinstance(v, str) else v


def read_imagefolder(root, image_column: str = "image", conditioning_image_column: str = "conditioning_image",
                     caption_column: str = "text") -> Rows:
    """Rows of a Hugging Face imagefolder (root/metadata.jsonl), absolute paths; the image column may be "file_name"."""
    path = Path(root).resolve() / "metadata.jsonl"
    recs = [(where, rec, path.parent) for where, rec in _records(path)]
    return _rows_of(recs, path, image_column, conditioning_image_column, caption_column)


def read_table(path) -> list[tuple[str, dict, Path]]:
    """(where, record, the file's folder) of a local .json (JSON lines or an array of objects), .jsonl, .csv or
    .parquet file; where is "file:line" (JSON lines, CSV) or "file[row k]"."""
    path = Path(path).resolve()
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use one of "
                         f"{', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    if suffix == ".csv":
        import csv
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            recs = [(f"{path}:{reader.line_num}", dict(rec)) for rec in reader]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs the 'pyarrow' package (pip install pyarrow)") from None
        recs = [(f"{path}[row {k}]", rec) for k, rec in enumerate(pq.read_table(path).to_pylist())]
    elif path.read_text(encoding="utf-8").lstrip().startswith("["):
        import json
        data = json.loads(path.read_text(encoding="utf-8"))
        bad = next((k for k, rec in enumerate(data) if not isinstance(rec, dict)), None)
        if bad is not None:
            raise ValueError(f"{path}[row {bad}]: a JSON array must hold objects, one per sample")
        recs = [(f"{path}[row {k}]", rec) for k, rec in enumerate(data)]
    else:
        recs = [(f"{path}:{n}", rec) for n, rec in read_jsonl(path)]
    if not recs:
        raise ValueError(f"{path} holds no records")
    return [(where, rec, path.parent) for where, rec in recs]


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
        self.columns = cols
        self.names = {"image": image_column, "conditioning_image": conditioning_image_column, "text": caption_column}

    def __len__(self):
        return len(self.ds)

    def missing(self, role: str, n: int) -> list[int]:
        """Indices < n whose `role` column is null (read from the Arrow table: no image is decoded)."""
        col = dict(zip(("image", "conditioning_image", "text"), self.cols))[role]
        if col is None:
            return list(range(n))
        nulls = self.ds.data.column(col).slice(0, n).is_null().to_pylist()
        return [i for i, v in enumerate(nulls) if v]

    def __getitem__(self, i):
        rec = self.ds[int(i)]
        img, cond, text = self.cols
        return {"image": rec[img], "conditioning_image": rec[cond] if cond else None, "text": rec[text],
                "where": f"row {int(i)}"}


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
                         f"cached datasets can be used offline (local files: --data_files or --dataset_name "
                         f"FILE{'/'.join(TABLE_SUFFIXES)})") from None


def _looks_like_file(name: str) -> bool:
    return Path(name).suffix.lower() in TABLE_SUFFIXES or Path(name).is_file()


def build_rows(train_data_dir=None, dataset_name=None, dataset_config_name=None, cache_dir=None,
               image_column="image", conditioning_image_column="conditioning_image", caption_column="text",
               data_files=None):
    """Rows and their root from a local folder (fill50k or imagefolder layout), local table files (`data_files`,
    or a file as `dataset_name`; relative to `train_data_dir` when given, else the working directory) or a
    `datasets` dataset."""
    cols = dict(image_column=image_column, conditioning_image_column=conditioning_image_column,
                caption_column=caption_column)
    if data_files:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        if dataset_name is not None and dataset_name not in ("json", "csv", "parquet"):
            raise ValueError(f"--data_files reads local files; --dataset_name must then be unset or the format name "
                             f"json, csv or parquet (as load_dataset('csv', data_files=...)), got {dataset_name!r}")
        base = Path(train_data_dir) if train_data_dir is not None else Path.cwd()
        recs = [r for f in files for r in read_table(base / f)]
        return _rows_of(recs, ", ".join(map(str, files)), **cols), None
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("give exactly one of --train_data_dir (a local folder), --dataset_name or --data_files")
    if train_data_dir is not None:
        root = Path(train_data_dir)
        if not root.is_dir():
            raise ValueError(f"--train_data_dir {root} is not a directory")
        if (root / "prompt.json").is_file():
            return read_fill50k(root), root
        if (root / "metadata.jsonl").is_file():
            return read_imagefolder(root, **cols), root
        raise ValueError(f"{root} has neither prompt.json (fill50k layout) nor metadata.jsonl (imagefolder layout)")
    if not Path(dataset_name).is_dir() and _looks_like_file(dataset_name):
        return _rows_of(read_table(dataset_name), dataset_name, **cols), None
    root = Path(dataset_name).resolve() if Path(dataset_name).is_dir() else None
    return HFRows(_load_hf(dataset_name, dataset_config_name, cache_dir), root=root, **cols), root


def _missing(rows, role: str, n: int) -> list[int]:
    """Indices < n of rows without `role` (None / empty)."""
    if hasattr(rows, "missing"):
        return rows.missing(role, n)
    return [i for i in range(n) if _empty(rows[i].get(role), role)]


def _where(rows, i: int) -> str:
    """"file:line" of row i where its reader recorded one, else "row i"."""
    return (None if hasattr(rows, "missing") else rows[i].get("where")) or f"row {i}"


def check_rows(rows, n: int, conditioning: str) -> str:
    """Check rows [0, n) for an image, a caption and (unless conditioning='canny') a condition; the resolved mode."""
    names = getattr(rows, "names", {})
    for role, noun in (("image", "image"), ("text", "caption")):
        bad = _missing(rows, role, n)
        if bad:
            raise ValueError(f"{_where(rows, bad[0])}: no {noun} (column {names.get(role, role)!r}); "
                             f"{len(bad)} of {n} rows lack one")
    if conditioning == "canny":
        return "canny"
    col = names.get("conditioning_image", "conditioning_image")
    bad = _missing(rows, "conditioning_image", n)
    if bad and len(bad) == n:
        columns = getattr(rows, "columns", None)
        raise ValueError(f"no row has a conditioning image in column {col!r}"
                         + (f" (columns: {list(columns)})" if columns is not None else "")
                         + "; check --conditioning_image_column, or pass --conditioning canny to compute Canny "
                           "edge conditions from the images on the fly")
    if bad:
        raise ValueError(f"{_where(rows, bad[0])}: no conditioning image (column {col!r}); {len(bad)} of {n} rows "
                         f"lack one. Fix those rows, or pass --conditioning canny to use Canny edges for every row")
    return "dataset"


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
        self.conditioning = check_rows(rows, n, conditioning) if n else conditioning
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
            raise ValueError(f"{_where(self.rows, i)}: the caption is {type(text).__name__}, not text; check "
                             f"--caption_column")
        return {"pixel_values": _to_tensor(image) * 2 - 1, "conditioning_pixel_values": cond, "text": text,
                "index": i}


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep captions and indices as lists."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "conditioning_pixel_values": torch.stack([it["conditioning_pixel_values"] for it in items]),
            "text": [it["text"] for it in items], "index": [it["index"] for it in items]}
