"""Per-epoch QAT diagnostics for every method: transition rate and distance to the levels."""

from __future__ import annotations

from typing import Any

import torch

from .distributed import all_reduce
from .method import Method

SAMPLE_PERIOD = 10


class TransitionMonitor:
    """Samples level transitions of the latent weights, on the device.

    Transition rate (TALR paper, arXiv 2404.19248): the fraction of quantized weights whose
    integer level index `d = nearest level of w` changes in one step. Every `period`-th
    step the indices are kept (uint8), and the next step's are compared with them; the
    epoch's rate is the mean over these sampled step pairs, an unbiased estimate of the
    per-step rate at 2/`period` of the cost of counting every step. Distance to the
    levels: `mean |w - hardquant(w)|` over all quantized weights at the end of the epoch.
    Both use the method's own latent weights and levels (`Method.level_indices()`,
    `Method.distance_to_levels()`); indices are compared, so a rescaling that keeps every
    weight's level is no transition, while a level refresh that moves weights across a
    midpoint is. Nothing here waits on the host until `epoch_summary()`. Under FSDP each rank
    counts its own shards, and the epoch's counts are summed over the ranks.
    """

    def __init__(self, method: Method, period: int = SAMPLE_PERIOD) -> None:
        self.method = method
        self.period = period
        self.steps = 0
        self.kept: torch.Tensor | None = None
        self.changes: torch.Tensor | None = None
        self.pairs = 0

    @torch.no_grad()
    def after_step(self) -> None:
        phase = self.steps % self.period
        self.steps += 1
        if phase == 0:
            self.kept = self.method.level_indices()
        elif phase == 1 and self.kept is not None:
            indices = self.method.level_indices()
            if indices is not None and indices.shape == self.kept.shape:
                changed = (indices != self.kept).sum()
                self.changes = changed if self.changes is None else self.changes + changed
                self.pairs += 1
            self.kept = None

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "kept": self.kept, "changes": self.changes, "pairs": self.pairs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.method.device
        self.steps, self.pairs = state["steps"], state["pairs"]
        self.kept = None if state["kept"] is None else state["kept"].to(device)
        self.changes = None if state["changes"] is None else state["changes"].to(device)

    @torch.no_grad()
    def epoch_summary(self) -> dict[str, float]:
        """{"transition_rate", "transition_pairs", "distance_to_levels"} for the epoch; resets the count."""
        distance, indices = self.method.distance_to_levels(), self.method.level_indices()
        if distance is None or indices is None:
            return {}
        counts = [float(indices.numel()), 0.0 if self.changes is None else self.changes.item(), distance.item()]
        total, changes, distance_sum = all_reduce(counts) if self.method.sharded else counts
        rate = changes / (self.pairs * total) if self.changes is not None and self.pairs else float("nan")
        summary = {"transition_rate": rate, "transition_pairs": self.pairs, "distance_to_levels": distance_sum / total}
        self.changes, self.pairs = None, 0
        return summary
