"""Where a run's time goes: steady-state training, warm-up, evaluation, checkpoints, waiting for data."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .step import sync

TIMING_WARMUP_STEPS = 10  # steps after each (re)start excluded from the steady-state step time (caches, compile)


class SteadyClock:
    """Steady-state training time: every stretch of training (an epoch, or its part after a resume)
    after the first `warmup` steps of the process, without the time spent writing checkpoints; the
    device is synchronised at the edges of each measured stretch."""

    def __init__(self, device: torch.device, warmup: int, saved: dict[str, Any] | None = None) -> None:
        self.device, self.warmup = device, warmup
        self.totals = {"steady_train_s": 0.0, "steady_steps": 0, "eval_s": 0.0, "checkpoint_s": 0.0,
                       "checkpoints": 0, "data_wait_s": 0.0, **(saved or {})}
        self.wall_before = self.totals.pop("wall_s", 0.0)  # the run's time in the processes before this one
        self.process_start = time.perf_counter()
        self.steps_here = 0
        self.stretch_start: float | None = None
        self.stretch_steps = 0
        self.paused = 0.0

    def begin(self) -> None:
        if self.steps_here >= self.warmup:
            sync(self.device)
            self.stretch_start, self.stretch_steps, self.paused = time.perf_counter(), 0, 0.0

    def step_done(self) -> None:
        self.steps_here += 1
        if self.stretch_start is not None:
            self.stretch_steps += 1
        elif self.steps_here == self.warmup:
            sync(self.device)
            self.totals.setdefault("warmup_s", time.perf_counter() - self.process_start)
            self.stretch_start, self.stretch_steps, self.paused = time.perf_counter(), 0, 0.0

    def end(self) -> None:
        sync(self.device)
        if self.stretch_start is not None:
            self.totals["steady_train_s"] += time.perf_counter() - self.stretch_start - self.paused
            self.totals["steady_steps"] += self.stretch_steps
        self.stretch_start = None

    def snapshot(self) -> dict[str, Any]:
        """The totals so far, with `wall_s`, the run's time since it first started, over every resume."""
        return {**self.totals, "wall_s": self.wall_before + time.perf_counter() - self.process_start}

    def add(self, key: str, seconds: float) -> None:
        """Time spent outside training (evaluation, checkpoints); it is not training time."""
        self.totals[key] = self.totals.get(key, 0.0) + seconds
        if self.stretch_start is not None:
            self.paused += seconds


def waited_on(batches: Iterable[Any], loader: Any, clock: SteadyClock) -> Iterator[Any]:
    """The items of `batches` (drawn from `loader`), with the time the loader made each one wait for its
    worker processes (its `waited_s`, where it keeps one) added to the clock's `data_wait_s`."""
    if not hasattr(loader, "waited_s"):  # data on the device: nothing to wait for
        yield from batches
        return
    counted = loader.waited_s
    for item in batches:
        clock.totals["data_wait_s"] += loader.waited_s - counted
        counted = loader.waited_s
        yield item
