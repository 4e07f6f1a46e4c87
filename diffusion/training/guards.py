"""Non-finite guard shared by the trainers: loss, gradient norm and the updated weights of every optimizer step.

    guard = NonFiniteGuard(cfg.on_nonfinite)               # "stop" (default) or "skip"
    ...backward...
    if guard.check(step + 1, loss_value, grad_norm, last_checkpoint):   # before optimizer.step()
        optimizer.step()
        guard.check_weights(step + 1, params, last_checkpoint)          # after it, before EMA / checkpoints
        ema.update(...)
    optimizer.zero_grad()
    ...
    refuse_nonfinite(params, checkpoint_name)                           # before writing any weights

`check` runs before any state changes, so "stop" leaves the weights, the optimizer and every checkpoint
as they were after the last good step; "skip" drops the update (optimizer, EMA) and counts the step.
A finite loss and gradient can still give non-finite weights (adam eps 0 turns 0/0 into NaN, an infinite
learning rate): `check_weights` then stops in both modes, because an AdamW step cannot be undone (its moments
already hold the update); nothing has been written since the last good step, and since every checkpoint is
written after a checked step (and `refuse_nonfinite` re-checks), the checkpoint it names holds finite weights.
Pass the loss reduced over processes and the norm of the synchronized gradients so that every process
takes the same decision (no deadlock). With an fp16 GradScaler pass grad_norm=None: overflowing
gradients are the scaler's business (it skips those steps itself).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

__all__ = ["ON_NONFINITE", "NonFiniteError", "NonFiniteGuard", "grad_norm", "weights_finite", "refuse_nonfinite",
           "check_optimizer_args"]

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


def weights_finite(params: Iterable[torch.Tensor]) -> bool:
    """True iff every entry of every tensor is finite: one fused max-|w| per tensor (torch._foreach_norm, inf
    norm: no overflow for large finite weights, NaN propagates), one reduction and one sync for all of them."""
    tensors = [p.detach() for p in params]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all())


def refuse_nonfinite(params: Iterable[torch.Tensor], target, step: Optional[int] = None) -> None:
    """Raise NonFiniteError instead of writing `target` (a checkpoint or export) from non-finite weights."""
    if not weights_finite(params):
        raise NonFiniteError(f"refusing to write {target}: the weights hold NaN/Inf values", step)


def check_optimizer_args(learning_rates: dict, epsilons: dict, max_grad_norm: dict, betas: dict = None,
                         weight_decay: dict = None) -> None:
    """ValueError naming the flag for optimizer settings that make the first update non-finite (flag -> value)."""
    for name, v in learning_rates.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    for name, v in epsilons.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be > 0 (AdamW divides by sqrt(v) + eps: 0 gives 0/0 = NaN for every weight "
                             f"whose gradient is 0), got {v}; the usual value is 1e-8")
    for name, v in max_grad_norm.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (0 turns clipping off), got {v}")
    for name, v in (betas or {}).items():
        if not all(0 <= b < 1 for b in (v if isinstance(v, (tuple, list)) else (v,))):
            raise ValueError(f"{name} must lie in [0, 1), got {v}")
    for name, v in (weight_decay or {}).items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")


class NonFiniteGuard:
    """Checks loss and gradient norm of each optimizer step; see the module docstring."""

    def __init__(self, mode: str = "stop", phase: str = ""):
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {list(ON_NONFINITE)}, got {mode!r}")
        self.mode = mode
        self.step_name = f"{phase} step" if phase else "step"  # "VAE step 3" in a trainer with several phases
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
            f"non-finite {' and '.join(bad)} at {self.step_name} {step}: training stopped before the update; {kept} "
            f"(resume with --resume_from_checkpoint latest). Lower the learning rate, check the data, or pass "
            f"--on_nonfinite skip to drop such steps", step)

    def check_weights(self, step: int, params: Iterable[torch.Tensor], last_checkpoint=None) -> None:
        """After optimizer.step(): NonFiniteError (in both modes) when an updated weight is NaN/Inf."""
        if weights_finite(params):
            return
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise NonFiniteError(
            f"non-finite weights after the update of {self.step_name} {step} (its loss and gradient were finite): "
            f"training stopped, nothing was written; {kept} (resume with --resume_from_checkpoint latest). An AdamW "
            f"update cannot be undone, so this stops also with --on_nonfinite skip. Lower the learning rate or raise "
            f"the AdamW epsilon", step)
