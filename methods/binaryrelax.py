"""BinaryRelax: a relaxed quantization that is annealed to hard quantization."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qatbench.method import EVERY_GRANULARITY, ProxConfig, ProxMethod
from qatbench.params import param
from qatbench.registry import METHODS
from qatbench.schedules import linear_ramp, resolve_point


@dataclasses.dataclass(frozen=True)
class BinaryRelaxConfig(ProxConfig):
    anneal_start: float = param(0.0, "training step (or fraction of training) where the relaxation starts", ge=0)
    anneal_end: float = param(0.75, "training step (or fraction of training) from which p = hardquant(w)", ge=0)


@METHODS.register("binaryrelax")
class BinaryRelax(ProxMethod):
    """BinaryRelax (Yin et al., SIAM J. Imaging Sciences 2018), as `ProxBinaryRelax` of the PARQ reference.

    Prox map at training step t, with `theta = (t - start) / (end - start)` clipped to [0, 1]:
    `p = w` before `anneal_start`; `p = (1 - theta) w + theta hardquant(w)` in between;
    `p = hardquant(w)` from `anneal_end` on.
    """

    sharded_granularities = EVERY_GRANULARITY  # elementwise prox on flat buffers: shards reduce (--fsdp)

    Config = BinaryRelaxConfig

    def __init__(self, config: BinaryRelaxConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.anneal_start = resolve_point(config.anneal_start, total_steps, "anneal_start")
        self.anneal_end = max(self.anneal_start + 1, resolve_point(config.anneal_end, total_steps, "anneal_end"))
        self.theta = 0.0

    def prox(self, latent: Tensor, levels: Tensor, t: int) -> Tensor:
        theta = linear_ramp(t, self.anneal_start, self.anneal_end)
        return latent.lerp(self.nearest_level(latent, levels), theta)

    def prox_flat(self, latent: Tensor, t: int, out: Tensor) -> None:
        self.theta = linear_ramp(t, self.anneal_start, self.anneal_end)
        if self.theta == 0.0:
            out.copy_(latent)
        elif self.theta == 1.0:
            self.hard_quantize(latent, out=out)
        else:
            torch.lerp(latent, self.hard_quantize(latent, out=out), self.theta, out=out)

    def diagnostics(self) -> dict[str, float]:
        return {"theta": self.theta}

    def state_dict(self):
        return {**super().state_dict(), "theta": self.theta}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.theta = state["theta"]
