"""RTN: round-to-nearest post-training quantization, the baseline that shows what QAT buys."""

from __future__ import annotations

import torch
from torch import Tensor

from qatbench.method import EVERY_GRANULARITY
from qatbench.methods.fp import FullPrecision
from qatbench.registry import METHODS


@METHODS.register("rtn")
class RoundToNearest(FullPrecision):
    """Round-to-nearest (RTN) post-training quantization with the shared quantizer: no QAT.

    The weights train in full precision, `w <- base_step(w, grad L(w))`, exactly as `fp` does
    (same recipe, same seed: the same weights), and `finalize()` quantizes them once,
    `p = Q[nearest(w)]`, with levels Q estimated from the final weights. With `--epochs 0` and
    `--init` a full-precision checkpoint (an `fp` run's export), it is PTQ of that model with
    zero training steps. With `--act-bits A`, the activation quantizers are off while it trains and
    their steps are then set from a few training batches (the W+A post-training row).
    """

    quantizes = True
    sharded_granularities = EVERY_GRANULARITY
    trains_activation_steps = False  # with --act-bits: the steps are set on a few training batches after training

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.final_levels: list[Tensor] = []

    @torch.no_grad()
    def finalize(self) -> None:
        flat = self.flat_weights()
        levels = self.quant.levels(flat)
        self.quant.hard_quantize(flat, levels, out=flat)
        torch._foreach_copy_(self.views, self.layout.views(flat))
        self.final_levels = self.layout.table_views(levels.table)

    def level_tables(self) -> list[Tensor]:
        return self.final_levels
