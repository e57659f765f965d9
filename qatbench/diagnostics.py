"""Per-epoch QAT diagnostics for every method: transition rate and distance to the levels."""

from __future__ import annotations

import math

import torch

from .method import Method
from .quant import hard_quantize, level_indices


class TransitionMonitor:
    """Counts level transitions of the latent weights after every step, on the device.

    Transition rate (TALR paper, arXiv 2404.19248): the fraction of quantized weights whose
    integer level index `d = nearest level of w` changed in a step, averaged over the steps
    of an epoch. Distance to the levels: `mean |w - hardquant(w)|` over all quantized weights
    at the end of the epoch. Both use the method's own latent weights and levels
    (`Method.quantization_state()`); indices are counted, so a rescaling that keeps every
    weight's level is no transition, while a level refresh that moves weights across a
    midpoint is. Nothing here synchronizes with the host until `epoch_summary()`.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self.previous: list[torch.Tensor] = []
        self.changes: torch.Tensor | None = None
        self.counted_steps = 0

    @torch.no_grad()
    def after_step(self) -> None:
        state = self.method.quantization_state()
        if not state:
            return
        indices = [level_indices(rows, levels) for rows, levels in state]
        if self.previous:
            changed = sum((d != d_prev).sum() for d, d_prev in zip(indices, self.previous))
            self.changes = changed if self.changes is None else self.changes + changed
            self.counted_steps += 1
        self.previous = indices

    @torch.no_grad()
    def epoch_summary(self) -> dict[str, float]:
        """{"transition_rate", "distance_to_levels"} for the epoch that just ended; resets the count."""
        state = self.method.quantization_state()
        if not state:
            return {}
        total = sum(rows.numel() for rows, _ in state)
        rate = float("nan")
        if self.changes is not None and self.counted_steps:
            rate = self.changes.item() / (self.counted_steps * total)
        distance = sum((rows - hard_quantize(rows, levels)).abs().sum() for rows, levels in state).item() / total
        self.changes, self.counted_steps = None, 0
        return {"transition_rate": rate, "distance_to_levels": distance if math.isfinite(distance) else float("nan")}
