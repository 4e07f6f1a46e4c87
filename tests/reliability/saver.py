"""Crash-safety driver (python -m tests.reliability.saver ROOT): SIGKILLs real checkpoint saves on command.

Reads commands on stdin, one a line:  round DELAY MODE N
  forks a child that resumes from ROOT's latest checkpoint and saves steps k+1, k+2, ... forever
  (diffusion.training.checkpoint.save_checkpoint on a real Accelerator: ~20 MB of model / AdamW / trainer-object state,
  every value = the step) and SIGKILLs it:
    MODE fast: DELAY seconds after it announced its N-th save (a random moment, usually mid-write);
    MODE slow: inside the trainer's write_extra of its first save (deterministically mid-checkpoint).
  then prints one JSON line {"said": [child messages]} and waits for the next command ("quit" ends).
Forking after importing torch / accelerate once keeps each round cheap.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

SIZE = 1024


class Blob:
    """A trainer object saved with the checkpoint (like the trainers' EMA / LR scheduler) with a big tensor."""

    def __init__(self):
        self.step, self.data = 0, torch.zeros(SIZE, SIZE)

    def state_dict(self):
        return {"step": self.step, "data": self.data}

    def load_state_dict(self, state):
        self.step, self.data = int(state["step"]), state["data"]


def build(accelerator):
    """Prepared Linear + AdamW (with state) + a Blob (save / load it as objects={"blob": blob}), identical in the
    saver and the test."""
    torch.manual_seed(0)
    model = torch.nn.Linear(SIZE, SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # AdamW state without autograd (whose first backward costs seconds)
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    model, opt = accelerator.prepare(model, opt)
    return model, opt, Blob()


def _adam_state(opt):
    return getattr(opt, "optimizer", opt).state


@torch.no_grad()
def fill(model, opt, blob, step: int) -> None:
    for p in model.parameters():
        p.fill_(step)
        _adam_state(opt)[p]["exp_avg"].fill_(step)
        _adam_state(opt)[p]["exp_avg_sq"].fill_(step)
    blob.step = step
    blob.data.fill_(step)


def values_ok(model, opt, blob, step: int) -> bool:
    """Every loaded value equals `step` (a torn or mixed checkpoint would not)."""
    tensors = [blob.data] + [t for p in model.parameters()
                             for t in (p, _adam_state(opt)[p]["exp_avg"], _adam_state(opt)[p]["exp_avg_sq"])]
    return blob.step == step and all(bool((t == step).all()) for t in tensors)


def child(root: Path, fd: int, slow: bool) -> None:
    from accelerate import Accelerator

    from diffusion.training.checkpoint import (load_checkpoint, remove_incomplete, resolve_checkpoint, save_checkpoint,
                                      save_weights)

    def say(msg: str) -> None:
        os.write(fd, (msg + "\n").encode())

    acc = Accelerator(cpu=True)
    model, opt, blob = build(acc)
    remove_incomplete(root)  # what the trainers do first
    ckpt = resolve_checkpoint("latest", root)
    step = int(load_checkpoint(acc, ckpt, {"blob": blob})["step"]) if ckpt is not None else 0
    if ckpt is not None and not values_ok(model, opt, blob, step):
        say(f"corrupt {ckpt}")
    say(f"resumed {step}")

    def extra(d: Path) -> None:  # the trainer's own files (weights + config), then a slow disk in MODE slow
        save_weights(acc.unwrap_model(model).state_dict(), d / "weights.safetensors", {"step": str(step)})
        (d / "config.yaml").write_text(f"step: {step}\n")
        if slow:
            say(f"extra {step}")
            time.sleep(120)

    while True:
        step += 1
        fill(model, opt, blob, step)
        say(f"saving {step}")
        save_checkpoint(acc, root, step, {"marker": step}, extra, total_limit=2, objects={"blob": blob})
        say(f"saved {step}")


def main() -> None:
    root = Path(sys.argv[1])
    torch.set_num_threads(1)
    from accelerate import Accelerator  # noqa: F401  (imported once, before forking)

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer costs seconds of lazy imports

    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        delay, slow, n = float(cmd[1]), cmd[2] == "slow", int(cmd[3])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            os.close(r)
            try:
                child(root, w, slow)
            finally:
                os._exit(1)
        os.close(w)
        said, count = [], 0
        with os.fdopen(r) as msgs:
            for msg in msgs:
                said.append(msg.strip())
                if msg.startswith("extra" if slow else "saving"):
                    count += 1
                    if count >= (1 if slow else n):
                        break
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(json.dumps({"said": said}), flush=True)


if __name__ == "__main__":
    main()
