"""Exponential moving average of model weights (Polyak averaging, as in DiT / SD3 training)."""
from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter sharded as a DTensor (FSDP2) all-gathered (a collective: every process calls update)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


class EMA:
    """ema <- d ema + (1 - d) w after each optimizer step, with warmup d_n = min(decay, (1 + n) / (10 + n))
    (the TF / timm schedule) unless warmup=False. `module` is a frozen copy used for sampling and export; it holds
    full parameters even when the trained model is sharded (FSDP2 DTensors are gathered in update)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards `model` (same architecture); buffers are copied."""
        d = self.current_decay()
        ema_p = [p for p in self.module.parameters()]
        new_p = [_full(p.detach()).to(e.dtype) for p, e in zip(model.parameters(), ema_p)]
        if len(ema_p) != len(list(model.parameters())):
            raise ValueError("EMA.update: model has a different number of parameters than the EMA copy")
        torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def to(self, *args, **kwargs) -> "EMA":
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay, self.warmup = float(state.get("decay", self.decay)), bool(state.get("warmup", self.warmup))
