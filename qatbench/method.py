"""The Method contract, and the optimizer-wrapper form shared by STE, BinaryRelax and PARQ.

A method wraps the task's base `torch.optim` optimizer and the shared quantizer,
and acts on the parameter groups the task marks with `"quant": True`. The harness
calls, per batch: forward + backward at the model's current weights, then
`method.step(closure)`, where `closure()` returns the batch loss at the current
weights (forward only, no graph). After training it calls `finalize()`, which must
leave every quantized tensor exactly on its levels.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .params import NoConfig, param
from .quant import QuantizerConfig, as_rows, estimate_levels, hard_quantize, midpoints
from .schedules import resolve_point

Closure = Callable[[], Tensor]


class Method(ABC):
    """One QAT method. Subclasses set `Config` (a dataclass) and implement `step`."""

    name: ClassVar[str] = ""  # set by the registry
    Config: ClassVar[type] = NoConfig
    quantizes: ClassVar[bool] = True  # False only for the full-precision baseline

    def __init__(
        self,
        config: Any,
        optimizer: torch.optim.Optimizer,
        quantizer: QuantizerConfig | None,
        total_steps: int,
        generator: torch.Generator,
    ) -> None:
        self.config = config
        self.optimizer = optimizer
        self.quantizer = quantizer
        self.total_steps = total_steps
        self.generator = generator
        self.steps = 0  # completed calls to step()

    def quantized_params(self) -> list[Tensor]:
        """The parameters of the groups the task marked as quantized."""
        return [p for g in self.optimizer.param_groups if g.get("quant") for p in g["params"]]

    @property
    def device(self) -> torch.device:
        return self.optimizer.param_groups[0]["params"][0].device

    def extra_forward_passes(self) -> int:
        """Forward passes of the batch that `step` makes through its closure (FOGZO's probes: 2n)."""
        return 0

    @abstractmethod
    def step(self, closure: Closure | None = None) -> None:
        """One QAT step, after the harness's forward + backward."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finalize(self) -> None:
        """Leave every quantized tensor exactly on its levels."""

    def diagnostics(self) -> dict[str, float]:
        """Scalars worth logging once per epoch (schedule values and the like)."""
        return {}

    def quantization_state(self) -> list[tuple[Tensor, Tensor]]:
        """(latent weight rows, levels) of every quantized tensor, for the transition diagnostics."""
        return []

    def level_tables(self) -> list[Tensor]:
        """After `finalize()`: the level table `(rows, m)` of each tensor of `quantized_params()` (in that
        order), whose entries the tensor's weights now are; what the export stores."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything `step`, `finalize` and `diagnostics` read, so that a loaded method continues exactly
        (the method generator's state is saved by the harness with the other generators)."""
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; tensors may come from the CPU and are moved to the parameters' device."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]

    def _on_device(self, tensors: list[Tensor]) -> list[Tensor]:
        return [t.to(self.device, copy=True) for t in tensors]


@dataclasses.dataclass(frozen=True)
class ProxConfig:
    """Hyper-parameters shared by every method of the optimizer-wrapper form."""

    warmup: float = param(0.0, "steps (or fraction of training) of plain full-precision training before QAT starts",
                          ge=0)
    quant_period: int = param(10, "re-estimate the levels Q every this many steps", ge=1)


class ProxMethod(Method):
    """`QuantOptimizer(base_optimizer, quantizer, prox_map)` of the PARQ paper (Jin et al., ICML 2025).

    Each step, for every quantized tensor with latent weights `w` and model weights `p`:
    (1) restore `p <- w`; (2) base optimizer step on `w`, with the gradient that was
    taken at the quantized/relaxed weights; (3) save `w <- p`; (4) every
    `quant_period` steps re-estimate Q from `w`; (5) set `p <- prox(w, Q, t)`.
    STE, BinaryRelax and PARQ differ only in `prox`.

    Cost: the copies of (1) and (3) are one `torch._foreach_copy_` each over all
    tensors; the level tables and their midpoints are computed at refresh only; `prox`
    writes straight into the model's weights. Memory: one latent copy of the quantized
    weights plus the level tables.
    """

    Config: ClassVar[type] = ProxConfig

    def __init__(self, config: ProxConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        assert quantizer is not None, "a quantizing method needs a quantizer"
        self.warmup_steps = resolve_point(config.warmup, total_steps, "warmup")
        self.params = self.quantized_params()
        self.weights = [p.detach() for p in self.params]  # the model's weights, as plain tensors
        self.param_rows = [self._rows(p) for p in self.params]  # their row views
        self.latent: list[Tensor] = []
        self.latent_rows: list[Tensor] = []
        self.levels: list[Tensor] = []
        self.bounds: list[Tensor] = []  # midpoints of the levels, cached between refreshes

    # -- the proximal map ------------------------------------------------------------
    @abstractmethod
    def prox(self, latent: Tensor, levels: Tensor, bounds: Tensor, t: int, out: Tensor) -> None:
        """Write the model weights for latent rows `latent` into `out`, at training step `t`.

        `levels` are the rows' level table, `bounds` its midpoints. `t` counts from the
        start of training, warm-up included, as the PARQ reference's `step_count`, so
        schedule points mean the same with or without a warm-up."""

    def prox_input(self, latent: Tensor) -> Tensor:
        """What the levels are estimated from and `prox` acts on (PARQ may shrink it)."""
        return latent

    def on_base_step(self) -> None:
        """Hook after each base-optimizer step of QAT (PARQ accumulates its learning rate)."""

    def estimate_gradients(self, closure: Closure | None) -> None:
        """Hook at the start of a QAT step, while the model holds `prox(w)` and `.grad` the
        gradient taken there: a method may replace `.grad` (FOGZO's zeroth-order estimate)."""

    def base_step(self) -> None:
        """The base optimizer's update of the latent weights (TALR rescales it per tensor)."""
        self.optimizer.step()

    def refresh_due(self, t: int) -> bool:
        """Whether to re-estimate the levels at QAT step t (TALR freezes them after the first)."""
        return t % self.config.quant_period == 0

    # -- the step ----------------------------------------------------------------------
    def _rows(self, p: Tensor) -> Tensor:
        return as_rows(p.detach(), self.quantizer.granularity)

    def _start_qat(self) -> None:
        """Keep the latent weights: a copy of the model's weights when QAT starts."""
        self.latent = [p.detach().clone() for p in self.params]
        self.latent_rows = [self._rows(w) for w in self.latent]

    def refresh_levels(self) -> None:
        """Re-estimate every tensor's level table (and its midpoints) from the latent weights."""
        self.levels = [estimate_levels(self.prox_input(w), self.quantizer) for w in self.latent_rows]
        self.bounds = [midpoints(q) for q in self.levels]

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        t = self.steps - self.warmup_steps  # QAT step index
        if t < 0:
            self.optimizer.step()
        else:
            if not self.latent:  # first QAT step: the model still holds the latent weights
                self._start_qat()
            else:
                self.estimate_gradients(closure)
            torch._foreach_copy_(self.weights, self.latent)
            self.base_step()
            self.on_base_step()
            torch._foreach_copy_(self.latent, self.weights)
            if self.refresh_due(t):
                self.refresh_levels()
            for w, levels, bounds, out in zip(self.latent_rows, self.levels, self.bounds, self.param_rows):
                self.prox(self.prox_input(w), levels, bounds, self.steps, out)
        self.steps += 1

    @torch.no_grad()
    def finalize(self) -> None:
        """Hard-quantize: `p <- Q[nearest(w)]` with the levels the model trained with."""
        if not self.latent:  # QAT never started (training shorter than the warm-up)
            self._start_qat()
            self.refresh_levels()
        for w, levels, bounds, out in zip(self.latent_rows, self.levels, self.bounds, self.param_rows):
            self.hard_quantize(self.prox_input(w), levels, bounds, out=out)

    def hard_quantize(self, rows: Tensor, levels: Tensor, bounds: Tensor, out: Tensor | None = None) -> Tensor:
        """`Q[nearest(w)]` by the fastest exact route for this quantizer's levels."""
        return hard_quantize(rows, levels, bounds, out=out, evenly_spaced=self.quantizer.evenly_spaced)

    def quantization_state(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.prox_input(w), q) for w, q in zip(self.latent_rows, self.levels)]

    def level_tables(self) -> list[Tensor]:
        return self.levels

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latent": self.latent, "levels": self.levels, "bounds": self.bounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.latent = self._on_device(state["latent"])
        self.latent_rows = [self._rows(w) for w in self.latent]
        self.levels = self._on_device(state["levels"])
        self.bounds = [midpoints(q) for q in self.levels]
