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
from qatbench.registry import METHODS

EPS_BAR = 1.0 / (2.0 * math.sqrt(3.0))
"""Perturbation radius, in quantizer steps, that matches the identity STE of rounding (FOGZO paper)."""


def unit_noise(like: Tensor, kind: str, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """`scale` times noise with zero mean and unit variance per coordinate: uniform on
    [-sqrt 3, sqrt 3], or Gaussian."""
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype).mul_(scale)
    uniform = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return uniform.sub_(0.5).mul_(2.0 * math.sqrt(3.0) * scale)


def zeroth_order_gradient(
    loss_at: Callable[[list[Tensor]], Tensor],
    weights: list[Tensor],
    guide: list[Tensor] | None,
    radius: list[Tensor],
    beta: float,
    samples: int,
    noise: str,
    generator: torch.Generator,
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """`G = (1/n) sum_i [L(w + eps v_i) - L(w - eps v_i)] / 2 * v_i / eps`, per coordinate.

    `v_i = sqrt(beta) s_i g_hat + sqrt(1 - beta) u_i`: `s_i` a random sign, `u_i` unit-variance
    noise, `g_hat = guide / ||guide||` with the norm over all tensors together. `radius`
    (`eps`) broadcasts against each weight (per row here). For a quadratic `L` the
    central difference is exact, so with `beta = 0` `E[G] = grad L`; with `beta = 1` and
    `eps -> 0`, `G = (g_hat . grad L) g_hat`, which is `guide` when `guide = grad L`.
    Random draws come from `generator` only, so a seeded run (and every rank of a
    data-parallel run seeded alike) draws the same perturbations. `G` is written into
    `out` when given (which may be `guide` itself: the guide is read first).
    """
    guide_unit: list[Tensor] = []
    if beta > 0.0:
        assert guide is not None, "beta > 0 needs the first-order guide"
        norm = torch.sqrt(sum(g.square().sum() for g in guide)).clamp(min=torch.finfo(weights[0].dtype).tiny)
        guide_unit = [g / norm for g in guide]
    estimate = [g.zero_() for g in out] if out is not None else [torch.zeros_like(w) for w in weights]
    for _ in range(samples):
        sign = torch.randint(0, 2, (), generator=generator, device=weights[0].device).to(weights[0].dtype) * 2 - 1
        guide_weight = math.sqrt(beta) * sign
        directions = []
        for i, w in enumerate(weights):
            if beta < 1.0:
                v = unit_noise(w, noise, generator, math.sqrt(1.0 - beta))
                if beta > 0.0:
                    v.addcmul_(guide_unit[i], guide_weight)
            else:
                v = guide_unit[i] * guide_weight
            directions.append(v)
        offsets = [r * v for r, v in zip(radius, directions)]
        perturbed = [w + o for w, o in zip(weights, offsets)]
        plus = loss_at(perturbed)
        minus = loss_at([p.sub_(o, alpha=2.0) for p, o in zip(perturbed, offsets)])
        half_difference = (plus - minus) / (2 * samples)
        for g, v, r in zip(estimate, directions, radius):
            g.addcmul_(v, half_difference / r)
    return estimate


@dataclasses.dataclass(frozen=True)
class ZOConfig(ProxConfig):
    samples: int = param(1, "n: perturbation samples per step (2n extra forward passes)", ge=1)
    alpha: float = param(1.0, "perturbation radius eps = alpha / (2 sqrt 3) quantizer steps (per row)", gt=0)
    noise: Literal["uniform", "gaussian"] = param("uniform", "unit-variance noise u (uniform matches the identity STE)")


@dataclasses.dataclass(frozen=True)
class FOGZOConfig(ZOConfig):
    beta_min: float = param(0.999, "guidance weight beta decays linearly from 1 to this over training", ge=0, le=1)


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
    # not under FSDP: a probe's perturbation of a whole tensor and its norm ||g|| would have to be drawn and
    # reduced over the ranks' shards to equal the unsharded run's
    sharded_granularities = frozenset()

    def __init__(self, config, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.qat_steps = max(1, total_steps - self.warmup_steps)
        self.current_beta = 1.0
        self.radius_rows: Tensor | None = None  # eps of every row
        self.gradient = self.layout.empty()  # the gradients, flat: the guide, then the estimate
        self.gradient_views = self.layout.views(self.gradient)

    def beta(self, t: int) -> float:
        """Guidance weight at QAT step t: 1 -> beta_min, linearly."""
        return 1.0 - (1.0 - self.config.beta_min) * min(1.0, t / self.qat_steps)

    def estimate_gradients(self, closure: Closure | None) -> None:
        assert closure is not None, "FOGZO needs the closure that evaluates the batch loss"
        self.current_beta = self.beta(self.steps - self.warmup_steps)
        grads = [p.grad for p in self.params]
        torch._foreach_copy_(self.gradient_views, grads)

        def quantized_loss(perturbed: list[Tensor]) -> Tensor:
            self.hard_quantize(perturbed[0], out=self.output)
            self._publish()
            return closure()

        guide = [self.gradient] if self.current_beta > 0 else None
        zeroth_order_gradient(quantized_loss, [self.latent_flat], guide, [self.layout.per_element(self.radius_rows)],
                              self.current_beta, self.config.samples, self.config.noise, self.generator,
                              out=[self.gradient])
        torch._foreach_copy_(grads, self.gradient_views)

    def refresh_levels(self) -> None:
        super().refresh_levels()
        self.refresh_radius()

    def refresh_radius(self) -> None:
        """The perturbation radius per row: alpha eps_bar quantizer steps, the step being
        (q_m - q_1) / (m - 1) (exact for uniform levels, the mean spacing for LSBQ)."""
        table = self.flat_levels.table
        spread = (table[:, -1] - table[:, 0]).clamp_(min=torch.finfo(table.dtype).tiny)
        self.radius_rows = spread.mul_(self.config.alpha * EPS_BAR / (table.shape[1] - 1))

    def memory_tensors(self) -> list[Tensor]:
        radius = [self.radius_rows] if self.radius_rows is not None else []
        return [*super().memory_tensors(), self.gradient, *radius]

    def extra_forward_passes(self) -> int:
        return 2 * self.config.samples

    def diagnostics(self) -> dict[str, float]:
        return {"beta": self.current_beta}

    def state_dict(self):
        return {**super().state_dict(), "beta": self.current_beta}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.current_beta = state["beta"]
        if self.flat_levels is not None:
            self.refresh_radius()
