"""Crash-safe, resumable training checkpoints on accelerate (shared by the trainers).

root/checkpoint-00000500/   accelerate save_state (model, optimizer, registered objects, RNG; safetensors)
                            + whatever the trainer writes (weights, config) + trainer_state.json (last)
Each is written to root/.tmp-checkpoint-*, every file and directory fsynced, and renamed into place
only when complete (then root is fsynced), so 'latest' never resolves to a half-written checkpoint,
even after a SIGKILL or power loss mid-save. Keep-last-N pruning happens after the rename, never
removes the checkpoint just written, and renames a checkpoint away (.del-*) before deleting it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["save_checkpoint", "list_checkpoints", "resolve_checkpoint", "read_trainer_state", "save_weights",
           "load_weights", "step_generator", "remove_incomplete", "load_checkpoint", "TRAINER_STATE"]

TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file, then every directory (deepest first), under path: contents before names."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Complete checkpoints under root as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(spec: str | None, root) -> Path | None:
    """None -> None; 'latest' -> newest complete checkpoint under root (None if there is none);
    a path -> that checkpoint (ValueError unless it is complete)."""
    if spec is None or spec == "":
        return None
    if spec == "latest":
        ckpts = list_checkpoints(root)
        return ckpts[-1][1] if ckpts else None
    path = Path(spec)
    if not path.is_dir() and (Path(root) / spec).is_dir():
        path = Path(root) / spec
    if not (path / TRAINER_STATE).is_file():
        valid = [str(p) for _, p in list_checkpoints(root)]
        raise ValueError(f"{spec} is not a complete checkpoint (no {TRAINER_STATE}); use 'latest' or one of: "
                         f"{valid or 'none saved yet under ' + str(root)}")
    return path


def read_trainer_state(path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def save_checkpoint(accelerator, root, step: int, state: dict | None = None,
                    write_extra: Callable[[Path], None] | None = None, total_limit: int | None = None) -> Path:
    """accelerator.save_state into a temp dir, add the trainer's files, then rename atomically to
    root/checkpoint-{step:08d}; keep only the newest `total_limit`. Call on every process."""
    root = Path(root)
    final, tmp = root / f"checkpoint-{step:08d}", root / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG file is in tmp before the rename
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **(state or {})}, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = root / f".old-checkpoint-{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        if total_limit is not None and total_limit > 0:
            for _, p in list_checkpoints(root)[:-total_limit]:
                if p != final:  # never the one just written (e.g. older run's higher steps in root)
                    trash = root / f".del-{p.name}"
                    os.replace(p, trash)  # atomic: a crash mid-delete leaves no half-deleted 'checkpoint-*'
                    shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_incomplete(root) -> None:
    """Delete temp dirs left by a crash during saving (main process, before training starts); a complete
    .old-checkpoint-N whose checkpoint-N is missing (crash while re-saving step N) is moved back."""
    root = Path(root)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".old-checkpoint-") and (p / TRAINER_STATE).is_file() \
                    and not (root / p.name[len(".old-"):]).exists():
                os.replace(p, root / p.name[len(".old-"):])
                _fsync_dir(root)
            elif p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-", ".del-checkpoint-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(accelerator, path) -> dict:
    """accelerator.load_state(path) -> its trainer_state.json; a model / optimizer that does not match the
    checkpoint raises ValueError naming the checkpoint and the fix."""
    path = Path(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {path} does not match this run's model/optimizer ({type(e).__name__}: "
                         f"{str(e).strip()[:800]}); resume with the config it was saved with "
                         f"({path / 'config.yaml'} or the run's config.yaml), or use a new output_dir") from None
    return read_trainer_state(path)


def save_weights(state_dict: dict, path, metadata: dict | None = None) -> Path:
    """safetensors file of a state dict (contiguous CPU copies) with str -> str metadata; atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_weights(path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickle checkpoints (.pt/.bin/.ckpt) are not loaded "
                         f"(unpickling can run arbitrary code): convert it with safetensors.torch.save_file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # SafetensorError for truncated / corrupt files
        raise ValueError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); the file is corrupt or "
                         f"truncated: use another checkpoint") from None


def step_generator(seed: int, counter: int, rank: int = 0) -> torch.Generator:
    """CPU generator keyed by (seed, counter, rank): randomness of micro-batch `counter` depends on
    nothing else, so a resumed run draws exactly the same noise without saving generator state."""
    state = np.random.SeedSequence([int(seed), int(counter), int(rank)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
