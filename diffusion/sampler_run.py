"""A sampler function driven one model evaluation at a time (the engine under diffusion.scheduler_adapter).

A sampler owns its loop; SamplerRun runs it in a worker thread whose model_fn posts (x, t) and waits for the
caller's (x0, eps). dry_run finds a fixed-grid sampler's evaluation times with a zero model.
"""
from __future__ import annotations

import queue
import threading

import torch

from .schedule import Schedule


class Cancelled(BaseException):
    """Raised inside a worker's model_fn to unwind a sampler that is no longer wanted."""


class SamplerRun:
    """One sampler call in a daemon thread, driven one model evaluation at a time: the worker posts
    ("eval", x, t), ("done", x, None) or ("error", exc, None); the caller answers each "eval" with (x0, eps).
    It holds no reference to the scheduler, so a scheduler that is garbage-collected cancels it."""

    def __init__(self, fn, x_T, ts, schedule, generator, options: dict, grad: bool):
        self._out, self._in = queue.SimpleQueue(), queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, args=(fn, x_T, ts, schedule, generator, options, grad),
                                       name="ProjectScheduler-sampler", daemon=True)
        self.thread.start()

    def _work(self, fn, x_T, ts, schedule, generator, options, grad):
        try:
            with torch.set_grad_enabled(grad):  # grad mode is per thread: follow the pipeline's (no_grad)
                x = fn(self._model_fn, x_T, ts, schedule, generator=generator, **options)
            self._out.put(("done", x, None))
        except Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001  (raised again by the caller's step())
            self._out.put(("error", exc, None))

    def _model_fn(self, x, t):
        self._out.put(("eval", x, t))
        reply = self._in.get()
        if reply is None:
            raise Cancelled
        return reply

    def next(self) -> tuple:
        return self._out.get()

    def answer(self, x0: torch.Tensor, eps: torch.Tensor) -> tuple:
        self._in.put((x0, eps))
        return self._out.get()

    def cancel(self) -> None:
        self._in.put(None)  # unblocks a worker waiting for a model output; ignored by a finished one
        self.thread.join(timeout=10)


def dry_run(fn, ts: torch.Tensor, schedule: Schedule, options: dict) -> tuple[list, list]:
    """Evaluation times of sampler `fn` on grid ts (as float32, the dtype of a float32 or half run) and the
    evaluation index where each step starts (from its callback), from a run on a zero model."""
    times, starts = [], {}

    def zero_model(x, t):
        times.append(float(t[0]))
        return torch.zeros_like(x), torch.zeros_like(x)

    def note(info):
        starts.setdefault(info["i"], len(times) - 1)

    fn(zero_model, torch.zeros(1, 1), ts, schedule, generator=torch.Generator().manual_seed(0), callback=note,
       **options)
    return times, [starts.get(i) for i in range(len(ts) - 1)]
