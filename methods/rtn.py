"""RTN: round-to-nearest post-training quantization, the baseline that shows what QAT buys."""

from __future__ import annotations

import torch
from torch import Tensor

from qatbench.methods.fp import FullPrecision
from qatbench.quant import estimate_levels, hard_quantize
from qatbench.registry import METHODS


@METHODS.register("rtn")
class RoundToNearest(FullPrecision):
    """Round-to-nearest (RTN) post-training quantization with the shared quantizer: no QAT.

    The weights train in full precision, `w <- base_step(w, grad L(w))`, exactly as `fp` does
    (same recipe, same seed: the same weights), and `finalize()` quantizes them once,
    `p = Q[nearest(w)]`, with levels Q estimated from the final weights. With `--epochs 0` and
    `--init` a full-precision checkpoint (an `fp` run's export), it is PTQ of that model with
    zero training steps.
    """

    quantizes = True

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.final_levels: list[Tensor] = []

    @torch.no_grad()
    def finalize(self) -> None:
        self.final_levels = [estimate_levels(rows, self.quantizer) for rows in self.rows]
        for rows, levels in zip(self.rows, self.final_levels):
            hard_quantize(rows, levels, out=rows, evenly_spaced=self.quantizer.evenly_spaced)

    def level_tables(self) -> list[Tensor]:
        return self.final_levels
