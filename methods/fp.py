"""Full-precision training: the baseline row of every leaderboard."""

from __future__ import annotations

import torch
from torch import Tensor

from qatbench.flat import FlatLayout
from qatbench.method import EVERY_GRANULARITY, Closure, Method
from qatbench.quant import FlatLevels, Quantizer, make_levels
from qatbench.registry import METHODS
from qatbench.sharding import local

LEVEL_REFRESH_PERIOD = 10


@METHODS.register("fp")
class FullPrecision(Method):
    """No quantization: `w <- base_step(w, grad L(w))`. Bits do not apply.

    For the transition diagnostics only, the weights are measured against the levels
    they would be quantized to (the harness passes the task's quantizer at 2 bits),
    re-estimated every 10 steps by the shared quantizer (`qatbench.quant.Quantizer`) over
    a flat copy of the quantized weights.
    """

    quantizes = False
    sharded_granularities = EVERY_GRANULARITY  # the shared quantizer reduces rows that span the ranks (--fsdp)

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.views = [local(p.detach()) for p in self.quantized_params()] if quantizer else []
        self.layout = FlatLayout(self.views, quantizer.granularity, self.sharded) if self.views else None
        self.quant = Quantizer(quantizer, self.layout) if self.layout is not None else None
        self.levels: FlatLevels | None = None
        self.levels_step = -LEVEL_REFRESH_PERIOD

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        self.optimizer.step()
        self.steps += 1

    def flat_weights(self) -> Tensor:
        """A flat copy of the quantized weights, in the layout's order."""
        flat = self.layout.empty()
        torch._foreach_copy_(self.layout.views(flat), self.views)
        return flat

    def _current_levels(self, flat: Tensor) -> FlatLevels:
        """The levels the weights would get, re-estimated when asked, at most every 10 steps."""
        if self.levels is None or self.steps - self.levels_step >= LEVEL_REFRESH_PERIOD:
            self.levels = self.quant.levels(flat)
            self.levels_step = self.steps
        return self.levels

    @torch.no_grad()
    def level_indices(self) -> Tensor | None:
        if self.quant is None:
            return None
        flat = self.flat_weights()
        return self.quant.indices(flat, self._current_levels(flat)).to(torch.uint8)

    @torch.no_grad()
    def distance_to_levels(self) -> Tensor | None:
        if self.quant is None:
            return None
        flat = self.flat_weights()
        return (flat - self.quant.hard_quantize(flat, self._current_levels(flat))).abs_().sum()

    def memory_tensors(self) -> list[Tensor]:
        levels = self.levels
        derived = [t for t in (levels.element_steps, levels.bounds, levels.padded) if t is not None] if levels else []
        return derived

    def state_dict(self):
        levels = self.levels
        return {**super().state_dict(), "levels": None if levels is None else levels.table,
                "level_steps": None if levels is None else levels.steps, "levels_step": self.levels_step}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.levels_step = state["levels_step"]
        self.levels = None if state["levels"] is None else make_levels(
            state["levels"].to(self.device), None if state["level_steps"] is None else state["level_steps"].to(
                self.device), self.layout)
