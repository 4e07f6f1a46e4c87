"""Checks the trainers run before they load a model or write a file, and their command-line exit-2 contract.

Bad input (a bound, a missing local model, a model that does not fit, too little memory) raises ValueError naming
the flag and the fix. The trainers' main() runs inside `cli_errors(prog)`: a ValueError / missing file prints
`prog: error: ...` and exits 2, as a bad flag does; a NonFiniteError (valid input, training diverged) exits 1.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

__all__ = ["check_run_args", "require_local_dir", "require_package", "check_memory", "device_memory", "load_or_explain",
           "cli_errors", "GIB"]

GIB = 1024 ** 3
T = TypeVar("T")


def check_run_args(output_dir: str, resolution: Optional[int] = None, checkpoints_total_limit: Optional[int] = None,
                   ddp_timeout: Optional[float] = None) -> None:
    """Bounds shared by the trainers' configs (ValueError naming the flag)."""
    if not str(output_dir).strip():
        raise ValueError("output_dir must not be empty (it would write into the current directory); give a run "
                         "directory, e.g. --output_dir outputs/run1")
    if resolution is not None and resolution <= 0:
        raise ValueError(f"resolution must be > 0 pixels, got {resolution}")
    if checkpoints_total_limit is not None and checkpoints_total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1 (the number of newest checkpoints kept), got "
                         f"{checkpoints_total_limit}; leave it unset (None) to keep all")
    if ddp_timeout is not None and not (math.isfinite(ddp_timeout) and ddp_timeout > 0):
        raise ValueError(f"ddp_timeout must be a number of seconds > 0, got {ddp_timeout}")


def require_local_dir(path, flag: str, files: Sequence[str] = (), model: bool = True) -> Path:
    """`path` as an existing local directory holding `files` (JSON files must parse); else ValueError naming the
    flag, the path and what is wrong with it. A `model` path that looks like a hub id says so: nothing is
    downloaded."""
    p = Path(path)
    if not p.is_dir():
        hub = model and not p.exists() and "/" in str(path) and not str(path).startswith((".", "/", "~")) \
            and len(p.parts) == 2
        why = ("is not a local directory; hub ids are not downloaded (training runs offline): download it first, "
               f"e.g. `huggingface-cli download {path} --local-dir DIR`, and pass DIR") if hub else \
            "is a file, not a directory" if p.exists() else "does not exist"
        raise ValueError(f"{flag} {path} {why}")
    missing = [f for f in files if not (p / f).exists()]
    if missing:
        raise ValueError(f"{flag} {path} lacks {missing}: not the expected diffusers-format directory")
    for f in files:
        if f.endswith(".json"):
            try:
                json.loads((p / f).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{flag}: {p / f} is not valid JSON ({e}); the file is empty, truncated or "
                                 f"corrupt: restore it") from None
    return p


def require_package(name: str, flag: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise ValueError(f"{flag} needs the optional {name} package (pip install {name}); or leave {flag} off")


def device_memory() -> tuple[int, str]:
    """(bytes, name) of the memory a single-device run trains in: the first GPU's, else the machine's RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3g} GiB" if nbytes < 1000 * GIB else f"{nbytes / GIB:,.0f} GiB"


def check_memory(need: dict[str, float], fix: str, total: Optional[int] = None) -> None:
    """Refuse a run whose lower bound on memory (`need`: what -> bytes, e.g. the float32 input batch alone)
    exceeds the device's memory; the message gives the numbers and `fix`."""
    have, where = (total, "memory") if total is not None else device_memory()
    if sum(need.values()) > have:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items() if v)
        raise ValueError(f"this run needs more than {_gib(sum(need.values()))} ({parts}; a lower bound, before any "
                         f"model activation) but the {where} holds {_gib(have)}; {fix}")


def load_or_explain(what: str, path, load: Callable[[], T]) -> T:
    """load(), with loader errors (bad JSON, missing / truncated weights, wrong layout) turned into a ValueError
    naming what was loaded from which path."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()
        raise ValueError(f"cannot load the {what} from {path}: {type(e).__name__}: "
                         f"{' '.join(msg)[:600] if msg else ''}") from e


@contextmanager
def cli_errors(prog: str):
    """Command-line boundary: bad input -> `prog: error: ...` on stderr and exit 2; divergence -> exit 1."""
    from .guards import NonFiniteError

    try:
        yield
    except NonFiniteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
