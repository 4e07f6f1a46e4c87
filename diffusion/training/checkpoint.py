"""Crash-safe, resumable training checkpoints on accelerate (shared by the trainers).

root/checkpoint-00000500/   accelerate save_state (model: safetensors; optimizer, RNG: torch zip pickles)
                            + <name>_state.safetensors per trainer object (LR scheduler, EMA: tensors + JSON)
                            + whatever the trainer writes (weights, config)
                            + manifest.json (run id, resolved config, every file's size) + trainer_state.json (last)
Each is written to root/.tmp-checkpoint-*, every file and directory fsynced, and renamed into place
only when complete (then root is fsynced), so 'latest' never resolves to a half-written checkpoint,
even after a SIGKILL or power loss mid-save. Keep-last-N pruning happens after the rename, never
removes the checkpoint just written, and renames a checkpoint away (.del-*) before deleting it.

Loading runs no code: every file is checked before accelerate reads it (torch pickles with weights_only=True,
sizes against the manifest, formats); a file that needs full unpickling is refused unless allow_pickle, a
truncated or missing one makes the checkpoint corrupt ('latest' then falls back to an older one). FSDP sharded
state (torch.distributed.checkpoint: .distcp + a pickled .metadata) loads only with allow_pickle.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import fsync_dir, fsync_tree, replace_dir

__all__ = ["save_checkpoint", "list_checkpoints", "resolve_checkpoint", "read_trainer_state", "save_weights",
           "load_weights", "step_generator", "remove_incomplete", "load_checkpoint", "check_checkpoint",
           "read_manifest", "save_state", "load_state", "RunError", "CorruptCheckpointError", "PickleRefusedError",
           "TRAINER_STATE", "MANIFEST"]

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TORCH_PICKLES = (".bin", ".pkl", ".pt", ".pth", ".ckpt")
_PICKLE_MAGIC = (b"PK\x03\x04",) + tuple(bytes([0x80, v]) for v in range(2, 6))  # torch zip, pickle protocol 2-5


class RunError(ValueError):
    """A run cannot start or resume as asked (message: the file or flag and the fix); the CLIs exit with 2."""


class CorruptCheckpointError(RunError):
    """A checkpoint file is truncated, missing or unreadable."""


class PickleRefusedError(RunError):
    """A checkpoint file would need full unpickling (which can run arbitrary code)."""


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


def resolve_checkpoint(spec: str | None, root, allow_pickle: bool = False,
                       log: Callable[[str], None] = print) -> Path | None:
    """None -> None; 'latest' -> newest complete, readable checkpoint under root (None if there is none; a corrupt
    one is skipped, saying so; RunError if none is readable); a path, a name under root or the diffusers spelling
    checkpoint-<step> -> that checkpoint (RunError unless it is complete and readable)."""
    if spec is None or spec == "":
        return None
    if spec == "latest":
        ckpts, bad = list_checkpoints(root), []
        for _, path in reversed(ckpts):
            try:
                check_checkpoint(path, allow_pickle)
            except CorruptCheckpointError as e:
                bad.append(str(e))
                log(f"{e}; falling back to the previous checkpoint")
                continue
            if bad:
                log(f"resuming from {path} (falling back to it: {len(bad)} newer checkpoint(s) are corrupt)")
            return path
        if bad:
            raise CorruptCheckpointError(f"no readable checkpoint under {root}: " + "; ".join(bad) +
                                         ". Restore them, delete them, or start over with --overwrite_output_dir")
        return None
    path = Path(spec)
    if not path.is_dir() and (Path(root) / spec).is_dir():
        path = Path(root) / spec
    m = _NAME.match(path.name)
    if not path.is_dir() and m and (Path(root) / f"checkpoint-{int(m.group(1)):08d}").is_dir():
        path = Path(root) / f"checkpoint-{int(m.group(1)):08d}"  # diffusers' spelling checkpoint-500
    if not (path / TRAINER_STATE).is_file():
        valid = [str(p) for _, p in list_checkpoints(root)]
        raise RunError(f"{spec} is not a complete checkpoint (no {TRAINER_STATE}); use 'latest' or one of: "
                       f"{valid or 'none saved yet under ' + str(root)}")
    try:
        check_checkpoint(path, allow_pickle)
    except CorruptCheckpointError as e:
        others = [p.name for _, p in list_checkpoints(root) if p.resolve() != path.resolve()]
        raise CorruptCheckpointError(f"{e}; resume from another checkpoint: 'latest' or one of {others}") from None
    return path


def read_trainer_state(path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def save_checkpoint(accelerator, root, step: int, state: dict | None = None,
                    write_extra: Callable[[Path], None] | None = None, total_limit: int | None = None,
                    objects: dict | None = None, identity: dict | None = None) -> Path:
    """accelerator.save_state into a temp dir, add `objects` (name -> object with state_dict(), e.g. LR scheduler
    and EMA; not registered with accelerate, whose custom_checkpoint_N.pkl loads with full unpickling) as
    <name>_state.safetensors, the trainer's files, manifest.json (`identity`: run id and config, + every file's
    size), then rename atomically to root/checkpoint-{step:08d}; keep only the newest `total_limit`.
    Call on every process."""
    _no_registered_objects(accelerator)
    root = Path(root)
    final, tmp = root / f"checkpoint-{step:08d}", root / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG file is in tmp before the rename
    if accelerator.is_main_process:
        for name, obj in (objects or {}).items():
            save_state(obj.state_dict(), tmp / f"{name}_state.safetensors")
        if write_extra is not None:
            write_extra(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({**(identity or {}), "files": files}, indent=1))
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **(state or {})}, indent=1))
        fsync_tree(tmp)
        replace_dir(tmp, final, root / f".old-checkpoint-{step:08d}")  # re-saving a step: the old one aside first
        if total_limit is not None and total_limit > 0:
            for _, p in list_checkpoints(root)[:-total_limit]:
                if p != final:  # never the one just written (e.g. older run's higher steps in root)
                    trash = root / f".del-{p.name}"
                    os.replace(p, trash)  # atomic: a crash mid-delete leaves no half-deleted 'checkpoint-*'
                    shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _no_registered_objects(accelerator) -> None:
    if getattr(accelerator, "_custom_objects", None):  # accelerate would unpickle their files with weights_only=False
        raise TypeError("objects registered with accelerator.register_for_checkpointing are restored by full "
                        "unpickling; pass them to save_checkpoint / load_checkpoint as objects={name: obj} instead")


def remove_incomplete(root) -> None:
    """Delete temp dirs left by a crash during saving (main process, before training starts); a complete
    .old-checkpoint-N whose checkpoint-N is missing (crash while re-saving step N) is moved back."""
    root = Path(root)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".old-checkpoint-") and (p / TRAINER_STATE).is_file() \
                    and not (root / p.name[len(".old-"):]).exists():
                os.replace(p, root / p.name[len(".old-"):])
                fsync_dir(root)
            elif p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-", ".del-checkpoint-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(accelerator, path, objects: dict | None = None, allow_pickle: bool = False) -> dict:
    """Check every file (check_checkpoint), accelerator.load_state(path), restore `objects` (as saved by
    save_checkpoint; an older checkpoint's custom_checkpoint_<i>.pkl in the objects' order, weights_only) ->
    its trainer_state.json. A model / optimizer that does not match the checkpoint raises RunError naming the
    checkpoint and the fix."""
    path = Path(path)
    check_checkpoint(path, allow_pickle)
    _no_registered_objects(accelerator)
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": not allow_pickle})
        for i, (name, obj) in enumerate((objects or {}).items()):
            f, legacy = path / f"{name}_state.safetensors", path / f"custom_checkpoint_{i}.pkl"
            if not f.is_file() and not legacy.is_file():
                raise KeyError(f"no {f.name}: the checkpoint holds no {name} state")
            obj.load_state_dict(load_state(f) if f.is_file() else _torch_load(legacy, not allow_pickle))
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise RunError(f"checkpoint {path} does not match this run's model/optimizer ({type(e).__name__}: "
                       f"{str(e).strip()[:800]}); resume with the config it was saved with "
                       f"({path / 'config.yaml'} or the run's config.yaml), or use a new output_dir") from None
    return read_trainer_state(path)


# ----------------------------------------------------------------------------------------------- safe formats
def _torch_load(path: Path, weights_only: bool = True, mmap: bool = False):
    """torch.load on CPU; weights_only admits tensors, containers and the numpy RNG states accelerate writes."""
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS as safe
    except ImportError:  # older accelerate: its RNG files hold numpy arrays
        safe = [np.ndarray, np.dtype, getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]
    import torch.serialization as ts

    with ts.safe_globals(list(safe)):
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)


def _check_file(path: Path, rel: str, allow_pickle: bool) -> None:
    """Raise PickleRefusedError / CorruptCheckpointError for one file (cheap: headers, no tensor data)."""
    ckpt = str(path)[: -len(rel) - 1]
    with open(path, "rb") as fh:
        head = fh.read(4)
    if path.suffix == ".distcp" or path.name == ".metadata":  # torch.distributed.checkpoint (FSDP sharded state)
        if allow_pickle:
            return
        raise PickleRefusedError(
            f"refusing to resume from {rel} of checkpoint {ckpt}: an FSDP SHARDED_STATE_DICT checkpoint "
            f"(torch.distributed.checkpoint), whose loading unpickles its .metadata in full (can run arbitrary code). "
            f"Pass --allow_pickle if you trust this checkpoint; save new runs with fsdp_state_dict_type: "
            f"FULL_STATE_DICT (configs/accelerate/fsdp.yaml) to resume without it")
    if path.suffix in _TORCH_PICKLES:
        try:
            _torch_load(path, mmap=head == b"PK\x03\x04")
        except pickle.UnpicklingError as e:
            if allow_pickle:
                return
            raise PickleRefusedError(
                f"refusing to unpickle {rel} of checkpoint {ckpt}: it holds objects other than tensors and plain "
                f"containers, and unpickling it can run arbitrary code ({str(e).splitlines()[0][:200]}). Resume "
                f"from a checkpoint you did not get from elsewhere, or pass --allow_pickle if you trust this one")
        except Exception as e:  # zip / pickle stream cut short
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {rel} is truncated or damaged "
                                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                f.metadata()
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif head.startswith(_PICKLE_MAGIC):  # other files (config.yaml): not parsed, but never a pickle
            raise ValueError("pickle data")
    except Exception as e:
        if head.startswith(_PICKLE_MAGIC):  # checked after the parse: a safetensors header length may look alike
            kind = {".safetensors": "safetensors", ".json": "JSON"}.get(path.suffix, f"a {path.suffix} file")
            raise PickleRefusedError(f"refusing to unpickle {rel} of checkpoint {ckpt}: it holds pickle data where "
                                     f"{kind} is expected (planted or replaced; pickles can run arbitrary code). "
                                     f"Restore the file or resume from another checkpoint") from None
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {rel} is truncated or not valid "
                                     f"{path.suffix[1:]} ({type(e).__name__}: {str(e)[:200]})") from None


def check_checkpoint(path, allow_pickle: bool = False) -> None:
    """Every file of a checkpoint can be read without running code: sizes as in its manifest (none missing or
    cut short), torch pickles load with weights_only=True, safetensors / JSON parse, no pickle anywhere else.
    Raises CorruptCheckpointError or PickleRefusedError (pickles only with allow_pickle) naming the file."""
    path = Path(path)
    files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    corrupt = None
    for rel, f in files.items():  # every file, so a planted pickle is refused even next to a damaged file
        try:
            _check_file(f, rel, allow_pickle)
        except CorruptCheckpointError as e:
            corrupt = corrupt or e
    if corrupt is not None:
        raise corrupt
    manifest = json.loads(files[MANIFEST].read_text()) if MANIFEST in files else {}
    for want, size in manifest.get("files", {}).items():
        if want not in files:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {want} is missing (listed in its "
                                         f"{MANIFEST})")
        if files[want].stat().st_size != size:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {want} has {files[want].stat().st_size} "
                                         f"bytes, {size} when saved (truncated or altered)")
    if TRAINER_STATE not in files:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {TRAINER_STATE} is missing")


def read_manifest(path) -> dict | None:
    """A checkpoint's manifest.json ({"run_id", "config", "files"}), None for checkpoints saved without one."""
    f = Path(path) / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else None


def save_state(state, path) -> Path:
    """A state_dict (nested dicts / lists of tensors, numbers, strings) as one safetensors file: the tensors, and
    the structure with every other value as JSON in its metadata. No pickle; atomic."""
    tensors: dict = {}

    def split(x, where: str):
        if torch.is_tensor(x):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: split(v, f"{where}.{k}") for k, v in x.items()}}
            return {"__items__": [[k, split(v, f"{where}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"__tuple__" if isinstance(x, tuple) else "__list__": [split(v, f"{where}.{i}")
                                                                          for i, v in enumerate(x)]}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {where} of a state dict safely "
                        f"(tensors, numbers, strings, lists and dicts only)")

    from safetensors.torch import save_file

    path = Path(path)
    meta = {"state": json.dumps(split(state, "state"))}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_state(path):
    """Inverse of save_state (a file with no such structure: its tensors as a dict)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "state" not in meta:
        return tensors

    def join(x):
        if not isinstance(x, dict):
            return x
        (tag, v), = x.items()
        if tag == "__tensor__":
            return tensors[v]
        if tag == "__dict__":
            return {k: join(e) for k, e in v.items()}
        if tag == "__items__":
            return {k: join(e) for k, e in v}
        return (tuple if tag == "__tuple__" else list)(join(e) for e in v)

    return join(json.loads(meta["state"]))


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
