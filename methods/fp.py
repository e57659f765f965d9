"""Full-precision training: the baseline row of every leaderboard."""

from __future__ import annotations

import torch

from qatbench.method import Closure, Method
from qatbench.registry import METHODS


@METHODS.register("fp")
class FullPrecision(Method):
    """No quantization: `w <- base_step(w, grad L(w))`. Bits do not apply."""

    quantizes = False

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        self.optimizer.step()
        self.steps += 1
