"""Non-finite loss / gradient guard shared by the trainers (stop with the step number, or skip the update).

    guard = NonFiniteGuard(cfg.on_nonfinite)               # "stop" (default) or "skip"
    ...backward...
    if guard.check(step + 1, loss_value, grad_norm, last_checkpoint):   # before optimizer.step()
        optimizer.step(); ema.update(...)
    optimizer.zero_grad()

The check runs before any state changes, so "stop" leaves the weights, the optimizer and every checkpoint
as they were after the last good step; "skip" drops the update (optimizer, EMA) and counts the step.
Pass the loss reduced over processes and the norm of the synchronized gradients so that every process
takes the same decision (no deadlock). With an fp16 GradScaler pass grad_norm=None: overflowing
gradients are the scaler's business (it skips those steps itself).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

__all__ = ["ON_NONFINITE", "NonFiniteError", "NonFiniteGuard", "grad_norm"]

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training hit a NaN/Inf loss or gradient; `step` is the optimizer step that failed."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of the gradients (float64); inf / nan when any gradient entry is non-finite."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


class NonFiniteGuard:
    """Checks loss and gradient norm of each optimizer step; see the module docstring."""

    def __init__(self, mode: str = "stop"):
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {list(ON_NONFINITE)}, got {mode!r}")
        self.mode = mode
        self.skipped: list[int] = []

    def check(self, step: int, loss, grad_norm: Optional[float] = None, last_checkpoint=None) -> bool:
        """True: apply this update. False: skip it (mode skip). Raises NonFiniteError (mode stop)."""
        loss = float(loss)
        bad = [] if math.isfinite(loss) else [f"loss {loss}"]
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad.append(f"gradient norm {float(grad_norm)}")
        if not bad:
            return True
        if self.mode == "skip":
            self.skipped.append(int(step))
            return False
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise NonFiniteError(
            f"non-finite {' and '.join(bad)} at step {step}: training stopped before the update; {kept} "
            f"(resume with --resume_from_checkpoint latest). Lower the learning rate, check the data, or pass "
            f"--on_nonfinite skip to drop such steps", step)
