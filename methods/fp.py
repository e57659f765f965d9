"""Full-precision training: the baseline row of every leaderboard."""

from __future__ import annotations

import torch
from torch import Tensor

from qatbench.method import Closure, Method
from qatbench.quant import as_rows, estimate_levels
from qatbench.registry import METHODS

LEVEL_REFRESH_PERIOD = 10


@METHODS.register("fp")
class FullPrecision(Method):
    """No quantization: `w <- base_step(w, grad L(w))`. Bits do not apply.

    For the transition diagnostics only, the weights are measured against the levels
    they would be quantized to (the harness passes the task's quantizer at 2 bits),
    re-estimated every 10 steps.
    """

    quantizes = False

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.levels: list[Tensor] = []

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        self.optimizer.step()
        if self.quantizer is not None and self.steps % LEVEL_REFRESH_PERIOD == 0:
            self.levels = [estimate_levels(rows, self.quantizer) for rows, _ in self._rows_and_levels(False)]
        self.steps += 1

    def _rows_and_levels(self, with_levels: bool = True) -> list[tuple[Tensor, Tensor | None]]:
        rows = [as_rows(p.data, self.quantizer.granularity) for p in self.quantized_params()]
        return list(zip(rows, self.levels)) if with_levels else [(r, None) for r in rows]

    def quantization_state(self) -> list[tuple[Tensor, Tensor]]:
        return self._rows_and_levels() if self.levels else []
