"""PARQ: piecewise-affine regularized quantization, by its proximal map."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from qatbench.method import EVERY_GRANULARITY, ProxConfig, ProxMethod
from qatbench.params import param
from qatbench.quant import FlatLevels, Quantizer, rows_quantizer
from qatbench.registry import METHODS
from qatbench.schedules import normalized_mirror_sigmoid, resolve_point


@dataclasses.dataclass(frozen=True)
class PARQConfig(ProxConfig):
    anneal_start: float = param(0.0, "training step (or fraction of training) where the slope starts to rise", ge=0)
    anneal_end: float = param(0.75, "training step (or fraction of training) from which p = hardquant(w)", ge=0)
    steepness: float = param(10.0, "k of the mirror sigmoid of the inverse slope", gt=0)
    center: float = param(0.5, "c of the mirror sigmoid (fraction of the annealing interval)", ge=0, le=1)
    slope_schedule: Literal["sigmoid", "aprox"] = param(
        "sigmoid", "inverse slope: annealed mirror sigmoid, or AProx's 1/gamma (gamma = max(1, sum of lr))"
    )
    quant_shrink: bool = param(False, "AProx shrinkage: quantize w / gamma instead of w")


def parq_map(quantizer: Quantizer, latent: Tensor, levels: FlatLevels, inv_slope: float,
             out: Tensor | None = None) -> Tensor:
    """Prox map of the piecewise-affine regularizer with inverse slope `rho`, on a flat buffer of rows and their
    levels (the shared quantizer's), into `out` when given.

    For `w` in its interval `[q_lo, q_hi]` of Q (below q_1 both ends are q_1, above q_m both are q_m):
    `p = clamp(c + (w - c) / rho, q_lo, q_hi)`, `c = (q_lo + q_hi) / 2`, in value units as the reference's
    `ProxPARQ`, with its arithmetic (at `rho = 1` too, where the affine form may round `w` by an ulp inside
    `[q_1, q_m]`: the trajectories stay the reference's bit for bit); `rho = 0` is hard quantization."""
    if inv_slope == 0.0:
        return quantizer.hard_quantize(latent, levels, out=out)
    q_lo, q_hi = quantizer.interval(latent, levels)
    return _relax_and_clamp(latent, q_lo, q_hi, max(inv_slope, torch.finfo(latent.dtype).tiny), out=out)


def parq_prox(latent: Tensor, levels: Tensor, inv_slope: float, evenly_spaced: bool = False) -> Tensor:
    """`parq_map` of one tensor's rows `(R, C)` with their level table `(R, m)` (the per-tensor hook)."""
    quantizer, flat, flat_levels = rows_quantizer(latent, levels, evenly_spaced)
    return parq_map(quantizer, flat, flat_levels, inv_slope).view_as(latent)


def _relax_and_clamp(latent: Tensor, q_lo: Tensor, q_hi: Tensor, rho: float, out: Tensor | None = None) -> Tensor:
    """`clamp(c + (w - c) / rho, q_lo, q_hi)`, `c = (q_lo + q_hi) / 2`."""
    center = (q_lo + q_hi).mul_(0.5)
    relaxed = (latent - center).div_(rho).add_(center)
    return torch.clamp(relaxed, q_lo, q_hi, out=out)


@METHODS.register("parq")
class PARQ(ProxMethod):
    """PARQ (Jin et al., "PARQ: Piecewise-Affine Regularized Quantization", ICML 2025), prox form `ProxPARQ`.

    Latent update `w <- base_step(w, grad L(p))`, model weights `p = prox_rho(w)` (see
    `parq_prox`). Inverse slope at training step t, `f = (t - t1) / (t2 - t1)`:
    before `anneal_start` (t1) no map at all, `p = w` (as the reference's `ProxPARQ`,
    which leaves the weights untouched there: no clamp to `[q_1, q_m]`); `rho = 0` (hard
    quantization) from `anneal_end` (t2) on; in between the normalized mirror sigmoid
    `rho = (s(f) - s(1)) / (s(0) - s(1))`, `s(f) = 1 / (1 + exp(k (f - c)))`; `anneal_end = anneal_start`
    means no annealing: `rho = 0` from `anneal_start` on, which is STE exactly (the slope driven to infinity
    from the first step; `tests/methods/test_parq.py`). The reference
    fixes the centre at `c = 1/2`; qatbench generalises it by normalising with the same
    end values `s(0)` and `s(1)`, so that `rho` still falls from 1 at t1 to 0 at t2 and the
    centre `c` moves the steepest point to the fraction `c` of the annealing interval
    (`c = 1/2` is the reference's curve exactly). AProx (`slope_schedule="aprox"`) instead
    sets `rho = 1 / gamma`, with `gamma = max(1, sum of the learning rates so far)`;
    `quant_shrink` applies the prox to `w / gamma`.
    """

    sharded_granularities = EVERY_GRANULARITY  # elementwise prox on flat buffers: shards reduce (--fsdp)

    Config = PARQConfig

    def __init__(self, config: PARQConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.anneal_start = resolve_point(config.anneal_start, total_steps, "anneal_start")
        # anneal_end == anneal_start: no annealing, rho = 0 (hard quantization, STE) from anneal_start on
        self.anneal_end = max(self.anneal_start, resolve_point(config.anneal_end, total_steps, "anneal_end"))
        self.cumulative_lr = 0.0
        self.inv_slope = 1.0

    @property
    def gamma(self) -> float:
        return max(1.0, self.cumulative_lr)

    def on_base_step(self) -> None:
        self.cumulative_lr += next(g["lr"] for g in self.optimizer.param_groups if g.get("quant"))

    def inverse_slope(self, t: int) -> float:
        """rho at training step t (1 before `anneal_start`, where no map is applied at all)."""
        if self.config.slope_schedule == "aprox":
            return 1.0 / self.gamma
        if t < self.anneal_start:
            return 1.0
        if t >= self.anneal_end:
            return 0.0
        fraction = (t - self.anneal_start) / (self.anneal_end - self.anneal_start)
        return normalized_mirror_sigmoid(fraction, self.config.steepness, self.config.center)

    def prox_input(self, latent: Tensor) -> Tensor:
        return latent / self.gamma if self.config.quant_shrink else latent

    def maps(self, t: int) -> bool:
        """Whether the prox map applies at step t: not before `anneal_start` (the reference leaves p = w)."""
        return self.config.slope_schedule == "aprox" or t >= self.anneal_start

    def prox(self, latent: Tensor, levels: Tensor, t: int) -> Tensor:
        if not self.maps(t):
            return latent.clone()
        return parq_prox(latent, levels, self.inverse_slope(t), self.quantizer.evenly_spaced)

    def prox_flat(self, latent: Tensor, t: int, out: Tensor) -> None:
        self.inv_slope = self.inverse_slope(t)
        if self.maps(t):
            parq_map(self.quant, latent, self.flat_levels, self.inv_slope, out=out)
        else:
            out.copy_(latent)

    def diagnostics(self) -> dict[str, float]:
        return {"inv_slope": self.inv_slope, "gamma": self.gamma}

    def state_dict(self):
        return {**super().state_dict(), "cumulative_lr": self.cumulative_lr, "inv_slope": self.inv_slope}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.cumulative_lr, self.inv_slope = state["cumulative_lr"], state["inv_slope"]
