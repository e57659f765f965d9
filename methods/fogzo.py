"""FOGZO: first-order-guided zeroth-order gradients of the quantized loss."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from qatbench.method import Closure, ProxConfig
from qatbench.methods.ste import STE
from qatbench.params import param
from qatbench.quant import as_rows
from qatbench.registry import METHODS

EPS_BAR = 1.0 / (2.0 * math.sqrt(3.0))
"""Perturbation radius, in quantizer steps, that matches the identity STE of rounding (FOGZO paper)."""


def unit_noise(like: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Noise with zero mean and unit variance per coordinate: uniform on [-sqrt 3, sqrt 3], or Gaussian."""
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    uniform = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return (2.0 * uniform - 1.0) * math.sqrt(3.0)


def zeroth_order_gradient(
    loss_at: Callable[[list[Tensor]], Tensor],
    weights: list[Tensor],
    guide: list[Tensor] | None,
    radius: list[Tensor],
    beta: float,
    samples: int,
    noise: str,
    generator: torch.Generator,
) -> list[Tensor]:
    """`G = (1/n) sum_i [L(w + eps v_i) - L(w - eps v_i)] / 2 * v_i / eps`, per coordinate.

    `v_i = sqrt(beta) s_i g_hat + sqrt(1 - beta) u_i`: `s_i` a random sign, `u_i` unit-variance
    noise, `g_hat = guide / ||guide||` with the norm over all tensors together. `radius`
    (`eps`) broadcasts against each weight (per row here). For a quadratic `L` the
    central difference is exact, so with `beta = 0` `E[G] = grad L`; with `beta = 1` and
    `eps -> 0`, `G = (g_hat . grad L) g_hat`, which is `guide` when `guide = grad L`.
    Random draws come from `generator` only, so a seeded run (and every rank of a
    data-parallel run seeded alike) draws the same perturbations.
    """
    if beta > 0.0:
        assert guide is not None, "beta > 0 needs the first-order guide"
        norm = torch.sqrt(sum(g.square().sum() for g in guide)).clamp(min=torch.finfo(weights[0].dtype).tiny)
        guide_unit = [g / norm for g in guide]
    estimate = [torch.zeros_like(w) for w in weights]
    for _ in range(samples):
        directions = []
        sign = torch.randint(0, 2, (), generator=generator, device=weights[0].device).to(weights[0].dtype) * 2 - 1
        for i, w in enumerate(weights):
            v = math.sqrt(1.0 - beta) * unit_noise(w, noise, generator) if beta < 1.0 else torch.zeros_like(w)
            if beta > 0.0:
                v = v + math.sqrt(beta) * sign * guide_unit[i]
            directions.append(v)
        plus = loss_at([w + r * v for w, r, v in zip(weights, radius, directions)])
        minus = loss_at([w - r * v for w, r, v in zip(weights, radius, directions)])
        half_difference = (plus - minus) / 2
        for g, v, r in zip(estimate, directions, radius):
            g.add_(half_difference * v / r)
    return [g / samples for g in estimate]


@dataclasses.dataclass(frozen=True)
class ZOConfig(ProxConfig):
    samples: int = param(1, "n: perturbation samples per step (2n extra forward passes)")
    alpha: float = param(1.0, "perturbation radius eps = alpha / (2 sqrt 3) quantizer steps (per row)")
    noise: Literal["uniform", "gaussian"] = param("uniform", "unit-variance noise u (uniform matches the identity STE)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")


@dataclasses.dataclass(frozen=True)
class FOGZOConfig(ZOConfig):
    beta_min: float = param(0.999, "guidance weight beta decays linearly from 1 to this over training")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta_min <= 1.0:
            raise ValueError(f"beta_min={self.beta_min} must be in [0, 1]")


@METHODS.register("fogzo")
class FOGZO(STE):
    """FOGZO (Yang & Aamodt, "Improving the Straight-Through Estimator with Zeroth-Order
    Information", NeurIPS 2025, arXiv 2510.23926).

    Model weights `p = hardquant(w)` as in STE. Each step, on the same mini-batch, the STE
    gradient `g` (taken by the harness) guides `n` zeroth-order probes of the quantized
    loss: `v_i = sqrt(beta) s_i g/||g|| + sqrt(1 - beta) u_i` and
    `G = (1/n) sum_i [L(Q(w + eps v_i)) - L(Q(w - eps v_i))] / (2 eps) v_i`,
    `eps = alpha / (2 sqrt 3)` times the quantizer step of each row; `G` replaces `g` in
    the base optimizer's update of `w`. `beta` falls linearly from 1 at the start of QAT
    to `beta_min` at the end. Cost: 2n forward passes per step beyond STE's forward and
    backward, under `torch.no_grad()`; so a step costs about (1 + 2n x forward share) x
    an STE step.
    """

    Config = FOGZOConfig

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.qat_steps = max(1, total_steps - self.warmup_steps)
        self.current_beta = 1.0

    def beta(self, t: int) -> float:
        """Guidance weight at QAT step t: 1 -> beta_min, linearly."""
        return 1.0 - (1.0 - self.config.beta_min) * min(1.0, t / self.qat_steps)

    def estimate_gradients(self, closure: Closure | None) -> None:
        assert closure is not None, "FOGZO needs the closure that evaluates the batch loss"
        granularity = self.quantizer.granularity
        self.current_beta = self.beta(self.steps - self.warmup_steps)
        weights = self.latent_rows
        guide = [as_rows(p.grad, granularity) for p in self.params] if self.current_beta > 0 else None
        # the quantizer step per row: (q_m - q_1) / (m - 1), exact for uniform levels, mean spacing for LSBQ
        radius = [self.config.alpha * EPS_BAR * (q[:, -1:] - q[:, :1]) / (q.shape[1] - 1) for q in self.levels]
        radius = [r.clamp(min=torch.finfo(r.dtype).tiny) for r in radius]

        def quantized_loss(perturbed: list[Tensor]) -> Tensor:
            for w, levels, bounds, out in zip(perturbed, self.levels, self.bounds, self.param_rows):
                self.hard_quantize(w, levels, bounds, out=out)
            return closure()

        estimate = zeroth_order_gradient(quantized_loss, weights, guide, radius, self.current_beta,
                                         self.config.samples, self.config.noise, self.generator)
        for p, g in zip(self.params, estimate):
            p.grad.copy_(g.view_as(p))

    def diagnostics(self) -> dict[str, float]:
        return {"beta": self.current_beta}
