"""PARQ: piecewise-affine regularized quantization, by its proximal map."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from qatbench.method import ProxConfig, ProxMethod
from qatbench.params import param
from qatbench.quant import grid, hard_quantize
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


def parq_prox(latent: Tensor, levels: Tensor, inv_slope: float, bounds: Tensor | None = None,
              out: Tensor | None = None, evenly_spaced: bool = False) -> Tensor:
    """Prox map of the piecewise-affine regularizer with inverse slope `rho`.

    For `w` in its interval `[q_lo, q_hi]` of Q (below q_1 both ends are q_1, above
    q_m both are q_m): `p = clamp(c + (w - c) / rho, q_lo, q_hi)`, `c = (q_lo + q_hi) / 2`.
    `rho = 1` is the identity inside `[q_1, q_m]` (a clamp); `rho = 0` is hard quantization.
    `bounds` (the midpoints of `levels`) serve the hard quantization when given.
    """
    if inv_slope == 0.0:
        return hard_quantize(latent, levels, bounds, out=out, evenly_spaced=evenly_spaced)
    if inv_slope == 1.0:
        return torch.clamp(latent, levels[:, :1], levels[:, -1:], out=out)
    rho = max(inv_slope, torch.finfo(latent.dtype).tiny)
    if evenly_spaced:  # the interval in closed form: j = clamp(floor(w / s - c_0), 0, m - 2), q = fl((c_0 + j) s)
        first, step = grid(levels)
        interval = (latent / step).sub_(first).floor_().clamp_(0, levels.shape[1] - 2).add_(first)
        q_lo = interval * step
        q_hi = (interval + 1).mul_(step)
    else:
        upper_index = torch.searchsorted(levels.contiguous(), latent.contiguous())
        q_lo = levels.gather(1, (upper_index - 1).clamp_(min=0))
        q_hi = levels.gather(1, upper_index.clamp_(max=levels.shape[1] - 1))
    center = (q_lo + q_hi).mul_(0.5)
    relaxed = (latent - center).div_(rho).add_(center)
    return torch.clamp(relaxed, q_lo, q_hi, out=out)


@METHODS.register("parq")
class PARQ(ProxMethod):
    """PARQ (Jin et al., "PARQ: Piecewise-Affine Regularized Quantization", ICML 2025), prox form `ProxPARQ`.

    Latent update `w <- base_step(w, grad L(p))`, model weights `p = prox_rho(w)` (see
    `parq_prox`). Inverse slope at training step t, `f = (t - t1) / (t2 - t1)`:
    `rho = 1` before `anneal_start` (t1), `rho = 0` (hard quantization) from `anneal_end`
    (t2) on, and in between the normalized mirror sigmoid
    `rho = (s(f) - s(1)) / (s(0) - s(1))`, `s(f) = 1 / (1 + exp(k (f - c)))`.
    AProx (`slope_schedule="aprox"`) instead sets `rho = 1 / gamma`, with
    `gamma = max(1, sum of the learning rates so far)`; `quant_shrink` applies the
    prox to `w / gamma`.
    """

    Config = PARQConfig

    def __init__(self, config: PARQConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.anneal_start = resolve_point(config.anneal_start, total_steps, "anneal_start")
        self.anneal_end = max(self.anneal_start + 1, resolve_point(config.anneal_end, total_steps, "anneal_end"))
        self.cumulative_lr = 0.0
        self.inv_slope = 1.0

    @property
    def gamma(self) -> float:
        return max(1.0, self.cumulative_lr)

    def on_base_step(self) -> None:
        self.cumulative_lr += next(g["lr"] for g in self.optimizer.param_groups if g.get("quant"))

    def inverse_slope(self, t: int) -> float:
        """rho at training step t."""
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

    def prox(self, latent: Tensor, levels: Tensor, bounds: Tensor, t: int, out: Tensor) -> None:
        self.inv_slope = self.inverse_slope(t)
        parq_prox(latent, levels, self.inv_slope, bounds, out=out, evenly_spaced=self.quantizer.evenly_spaced)

    def diagnostics(self) -> dict[str, float]:
        return {"inv_slope": self.inv_slope, "gamma": self.gamma}

    def state_dict(self):
        return {**super().state_dict(), "cumulative_lr": self.cumulative_lr, "inv_slope": self.inv_slope}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.cumulative_lr, self.inv_slope = state["cumulative_lr"], state["inv_slope"]
