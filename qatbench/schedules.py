"""Schedules over optimizer steps, given in steps or as fractions of training.

A schedule point `x` means "after `x` steps" when `x > 1` (it must then be an
integer), and "after `x * total_steps` steps" when `0 <= x <= 1`; so
`anneal_end=0.75` works at any training length and `anneal_end=1500` pins a step.
"""

from __future__ import annotations

import math

from .errors import QatbenchError


def resolve_point(x: float, total_steps: int, name: str = "schedule point") -> int:
    """Step index of schedule point `x` (see module docstring)."""
    if x < 0:
        raise QatbenchError(f"{name}={x} must be >= 0 (a step count, or a fraction of training in [0, 1])")
    if x <= 1:
        return round(x * total_steps)
    if x != int(x):
        raise QatbenchError(f"{name}={x}: a value above 1 is a step count and must be a whole number")
    return int(x)


def linear_ramp(t: int, start: int, end: int) -> float:
    """0 before `start`, 1 from `end` on, linear in between."""
    if t < start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start) / (end - start)


def normalized_mirror_sigmoid(fraction: float, steepness: float, center: float) -> float:
    """`(s(f) - s(1)) / (s(0) - s(1))`, `s(f) = 1 / (1 + exp(k (f - c)))`: 1 at f=0, 0 at f=1."""
    def s(f: float) -> float:
        return 1.0 / (1.0 + math.exp(steepness * (f - center)))

    return (s(fraction) - s(1.0)) / (s(0.0) - s(1.0))
