"""The run directory: one run per output_dir, and resuming only the run a checkpoint belongs to.

- `RunLock`: an exclusive fcntl.flock on output_dir/run.lock, which holds the holder's pid, host, start time and
  command line. The OS drops a process's flock when it dies, so a crashed run never blocks the next one (its
  lock file stays behind, unlocked). `exclusive_output_dir` wraps a trainer's train(cfg): the main process
  (RANK 0) holds the lock for the whole call; other ranks do not lock.
- `start_run`: called once by each trainer after the Accelerator exists. Resolves --resume_from_checkpoint
  ('latest' skips corrupt checkpoints, saying so), refuses a fresh run in a directory holding an earlier run's
  checkpoints (unless --overwrite_output_dir, which deletes them), and compares the config recorded in the
  checkpoint with this run's: keys in RESUME_MAY_CHANGE may differ, any other difference is refused naming the
  keys (--allow_config_change overrides). The returned identity (run id, config) goes into every checkpoint.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import MANIFEST, RunError, list_checkpoints, read_manifest, resolve_checkpoint
from .config import to_dict

__all__ = ["LOCK_NAME", "RESUME_MAY_CHANGE", "RunLock", "exclusive_output_dir", "config_changes", "Run", "start_run"]

LOCK_NAME = "run.lock"

# Config keys a resumed run may change (any trainer): where it writes, how long it trains, how often it logs,
# saves and validates, how it loads and reacts to failures, data loading speed. Everything else decides what
# is trained (model, data, seed, optimizer, schedule, precision) and must match the checkpoint.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume_from_checkpoint", "allow_pickle", "allow_config_change", "overwrite_output_dir",
    "max_train_steps", "num_train_epochs",
    "checkpointing_steps", "checkpoints_total_limit", "logging_steps", "logging_dir", "report_to",
    "tracker_project_name", "progress_bar", "validation_steps",
    "on_nonfinite", "dataloader_num_workers", "num_threads", "ddp_timeout",
})


# ----------------------------------------------------------------------------------------------- lock
def _main_rank() -> bool:
    """RANK 0 (torchrun / accelerate launch; MPI ranks for multi-CPU), or a single process."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var]) == 0
    return True


def _holder(data: bytes) -> str:
    try:
        h = json.loads(data.decode())
        return (f"pid {h['pid']} on host {h['host']}, started {h['started']} "
                f"({' '.join(map(str, h.get('argv', [])))[:300]})")
    except (ValueError, KeyError, UnicodeDecodeError):
        return "a run that is just starting (no details in the lock file yet)"


class RunLock:
    """Exclusive lock of a run directory for this process (context manager); RunError naming the holder if taken."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no flock
            print(f"warning: cannot lock {self.path.parent} on this platform; make sure no other run writes it")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(os.pread(fd, 65536, 0))
                os.close(fd)
                raise RunError(f"output_dir {self.path.parent} is in use by another run: {holder} (lock file "
                               f"{self.path}). Two runs writing one directory corrupt each other's checkpoints: "
                               f"wait for that run to end, or use another --output_dir") from None
            try:  # the holder removes the file when it ends: if it did so after our open, lock the current file
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened this file sees it is gone and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive_output_dir(train):
    """Decorator for train(cfg, ...): the main process holds RunLock(cfg.output_dir) for the whole call."""
    @functools.wraps(train)
    def locked(cfg, *args, **kwargs):
        if not _main_rank():
            return train(cfg, *args, **kwargs)
        with RunLock(cfg.output_dir):
            return train(cfg, *args, **kwargs)
    return locked


# ----------------------------------------------------------------------------------------------- identity
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> dict:
    """{key: (saved value, current value)} for keys both configs have that differ, outside RESUME_MAY_CHANGE
    (nested sections as dotted keys; tuples and lists compare equal). Keys only one side has (added or removed
    in another version of the code) are not compared."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys())
            if a[k] != b[k] and k.rsplit(".", 1)[-1] not in RESUME_MAY_CHANGE}


@dataclass
class Run:
    checkpoint: Optional[Path]  # to resume from, None for a new run
    identity: dict  # {"run_id", "config"}: pass to save_checkpoint(identity=...)


def start_run(accelerator, cfg, ckpt_root) -> Run:
    """Resolve and vet the checkpoint this run resumes from (see the module docstring); call on every process.
    Reads cfg.resume_from_checkpoint and the optional flags allow_pickle, allow_config_change, overwrite_output_dir."""
    spec = cfg.resume_from_checkpoint
    allow_pickle, allow_change, overwrite = (bool(getattr(cfg, k, False)) for k in
                                             ("allow_pickle", "allow_config_change", "overwrite_output_dir"))
    config = json.loads(json.dumps(to_dict(cfg)))
    accelerator.wait_for_everyone()  # the main process has cleaned up (remove_incomplete) before anyone looks
    if spec and overwrite:
        raise RunError(f"give one of --overwrite_output_dir and --resume_from_checkpoint (got {spec!r}): the first "
                       f"starts a new run deleting the checkpoints in {ckpt_root}, the second continues one")
    ckpt = resolve_checkpoint(spec, ckpt_root, allow_pickle, log=accelerator.print)
    if ckpt is None:
        earlier = [] if spec else list_checkpoints(ckpt_root)
        accelerator.wait_for_everyone()  # every rank has looked before the main one deletes anything
        if earlier and not overwrite:
            raise RunError(f"{ckpt_root} already holds checkpoints of an earlier run "
                           f"({', '.join(p.name for _, p in earlier)}): continue it with --resume_from_checkpoint "
                           f"latest, start over with --overwrite_output_dir (deletes them), or use another "
                           f"--output_dir")
        if earlier and accelerator.is_main_process:
            for _, p in earlier:
                trash = p.with_name(f".del-{p.name}")
                os.replace(p, trash)
                shutil.rmtree(trash, ignore_errors=True)
            accelerator.print(f"--overwrite_output_dir: deleted {len(earlier)} checkpoint(s) of the earlier run "
                              f"in {ckpt_root}")
        accelerator.wait_for_everyone()
        return Run(None, {"run_id": uuid.uuid4().hex, "config": config})

    manifest = read_manifest(ckpt) or {}
    run_id = manifest.get("run_id") or uuid.uuid4().hex
    if "config" not in manifest:
        if not allow_change:
            raise RunError(f"checkpoint {ckpt} records no run config (saved before checkpoints recorded their run), "
                           f"so it cannot be checked to belong to this run; resume it anyway with "
                           f"--allow_config_change, or start a new run in another --output_dir")
        accelerator.print(f"warning: {ckpt} records no run config; resuming it unchecked (--allow_config_change)")
    else:
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in
                            config_changes(manifest["config"], config).items())
        if changes and not allow_change:
            raise RunError(f"checkpoint {ckpt} was saved by run {run_id} with another config: {changes}. Resume "
                           f"with its settings (in {ckpt / MANIFEST}), start a new run in another --output_dir, "
                           f"or pass --allow_config_change to continue it with the new values")
        if changes:
            accelerator.print(f"warning: resuming {ckpt} with a changed config (--allow_config_change): {changes}")
    return Run(ckpt, {"run_id": run_id, "config": config})
