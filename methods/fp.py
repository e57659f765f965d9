"""Full-precision training: the baseline row of every leaderboard."""

from __future__ import annotations

import torch
from torch import Tensor

from qatbench.method import Closure, Method
from qatbench.quant import as_rows, estimate_levels, hard_quantize, level_indices
from qatbench.registry import METHODS
from qatbench.sharding import local

LEVEL_REFRESH_PERIOD = 10


@METHODS.register("fp")
class FullPrecision(Method):
    """No quantization: `w <- base_step(w, grad L(w))`. Bits do not apply.

    For the transition diagnostics only, the weights are measured against the levels
    they would be quantized to (the harness passes the task's quantizer at 2 bits),
    re-estimated every 10 steps.
    """

    quantizes = False
    sharded_granularities = frozenset({"channel"})  # under FSDP each rank measures its own rows

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.rows = [as_rows(local(p.detach()), quantizer.granularity)
                     for p in self.quantized_params()] if quantizer else []
        self.levels: list[Tensor] = []
        self.levels_step = -LEVEL_REFRESH_PERIOD

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        self.optimizer.step()
        self.steps += 1

    def _current_levels(self) -> list[Tensor]:
        """The levels the weights would get, re-estimated when asked, at most every 10 steps."""
        if self.steps - self.levels_step >= LEVEL_REFRESH_PERIOD:
            self.levels = [estimate_levels(rows, self.quantizer) for rows in self.rows]
            self.levels_step = self.steps
        return self.levels

    @torch.no_grad()
    def level_indices(self) -> Tensor | None:
        if not self.rows:
            return None
        pairs = zip(self.rows, self._current_levels())
        return torch.cat([level_indices(rows, levels).to(torch.uint8).flatten() for rows, levels in pairs])

    @torch.no_grad()
    def distance_to_levels(self) -> Tensor | None:
        if not self.rows:
            return None
        pairs = zip(self.rows, self._current_levels())
        return sum((rows - hard_quantize(rows, levels)).abs().sum() for rows, levels in pairs)

    def state_dict(self):
        return {**super().state_dict(), "levels": self.levels, "levels_step": self.levels_step}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.levels, self.levels_step = self._on_device(state["levels"]), state["levels_step"]
