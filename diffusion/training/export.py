"""Crash-safe files of a run directory outside its checkpoints: exported model directories and the metrics log.

    save_pretrained_atomic(vae, out_dir / "vae", safe_serialization=True)   # vae/ complete or absent
    with atomic_dir(out_dir / "pipeline") as tmp: ...write into tmp...      # several writers, one rename
    save_into(out_dir, lambda d: controlnet.save_pretrained(d))             # files into an existing run dir
    metrics = open_metrics(out_dir / "metrics.jsonl", resume_step)

A SIGKILL at any moment leaves either the old directory or the new complete one (never a 0-byte config.json);
the temp directory `.tmp-<name>` it may leave is removed by the next export of the same name.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .atomic import fsync_dir, fsync_tree, replace_dir

__all__ = ["atomic_dir", "save_pretrained_atomic", "save_into", "recover_export", "open_metrics"]


def recover_export(path) -> Path:
    """After a crash between atomic_dir's two renames (`path` moved aside, new one not yet in place): move the
    old complete directory back. Returns path."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        fsync_dir(path.parent)
    return path


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield an empty temp directory next to `path`; when the block ends without error, fsync it and rename it to
    `path` (an existing `path` is replaced). On an error the temp directory is removed and `path` is untouched."""
    path = recover_export(path)
    tmp, old = path.with_name(f".tmp-{path.name}"), path.with_name(f".old-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path, old)


def save_pretrained_atomic(model, path, **kwargs) -> Path:
    """model.save_pretrained(path, **kwargs) (diffusers / transformers / ours) through atomic_dir."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, **kwargs)
    return Path(path)


def save_into(directory, write: Callable[[Path], None], last: Sequence[str] = ("config.json",)) -> Path:
    """write(tmp) puts a model's files into a temp dir; each is then renamed into `directory` (a run directory that
    cannot be swapped as a whole), the names in `last` after the others: a config.json is only ever next to the
    weights written with it (a kill in between leaves the previous config with the new weights of the same model)."""
    directory = Path(directory)
    with atomic_dir(directory / ".export") as tmp:
        write(tmp)
    staged = directory / ".export"
    names = sorted(p.name for p in staged.iterdir())
    for name in sorted(names, key=lambda n: n in last):
        dst = directory / name
        if dst.is_dir() and not (staged / name).is_dir():
            raise ValueError(f"cannot export {name} into {directory}: a directory of that name is in the way")
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(staged / name, dst)
    shutil.rmtree(staged, ignore_errors=True)
    fsync_dir(directory)
    return directory


def _kept(line: str, resume_step: int) -> bool:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:  # a line torn by a kill
        return False
    return not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > resume_step)


def open_metrics(path, resume_step: int = 0):
    """Line-buffered append handle on a JSON-lines metrics log, after dropping the records of steps past
    `resume_step` (logged by a run that went on after the checkpoint now resumed) and torn lines, so no step
    appears twice. The rewrite is atomic."""
    path = Path(path)
    if path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [line for line in lines if line.strip() and _kept(line, resume_step)]
        if len(kept) != len(lines):
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
    return open(path, "a", buffering=1, encoding="utf-8")
