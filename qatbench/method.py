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
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import QatbenchError
from .flat import FlatLayout, alias
from .params import NoConfig, param
from .quant import FlatLevels, Quantizer, QuantizerConfig, hard_quantize, make_levels
from .schedules import resolve_point
from .sharding import is_sharded, local

Closure = Callable[[], Tensor]
EVERY_GRANULARITY = frozenset({"channel", "tensor"})


class Method(ABC):
    """One QAT method. Subclasses set `Config` (a dataclass) and implement `step`."""

    name: ClassVar[str] = ""  # set by the registry
    Config: ClassVar[type] = NoConfig
    quantizes: ClassVar[bool] = True  # False only for the full-precision baseline
    # the granularities under which the method trains FSDP's sharded parameters (`--fsdp`): opt in only where
    # every statistic over a row or a tensor that spans the ranks is reduced across them (`FlatLayout.row_reduce`,
    # `tensor_reduce`), as a per-tensor `prox(latent, ...)` sees only this rank's part of the row; empty: never
    sharded_granularities: ClassVar[frozenset[str]] = frozenset()
    # the weights' steps the method can train with: estimated from the weights, and/or learned (LSQ, `--scale`)
    step_sizes: ClassVar[frozenset[str]] = frozenset({"estimated"})
    freezes_weight_steps: ClassVar[bool] = False  # learned weight steps set once and kept (TALR), not trained
    activation_form: ClassVar[str] = "lsq"  # the activation quantizer's form (`qatbench.activations`): lsq | talr
    trains_activation_steps: ClassVar[bool] = True  # False: the steps are calibrated after training (rtn)
    default_scale_init: ClassVar[str] = "lsq"  # where learned steps start: lsq | 3std
    default_scale_lr: ClassVar[float | None] = None  # the learned steps' learning rate (None: the recipe's)
    scale_momentum: ClassVar[float | None] = None  # their SGD momentum (None: the recipe's)

    @classmethod
    def check_plugin(cls) -> None:
        """What `METHODS.register` checks of a method class: a Method with `step` implemented, a dataclass of
        hyper-parameters, and granularities it may shard that exist."""
        problems = []
        if not isinstance(cls, type) or not issubclass(cls, Method):
            raise QatbenchError(f"{cls!r} is not a qatbench.method.Method")
        if inspect.isabstract(cls):
            problems.append(f"implement {', '.join(sorted(cls.__abstractmethods__))}")
        if not dataclasses.is_dataclass(cls.Config):
            problems.append("its Config must be a dataclass (qatbench.params.param fields)")
        if not set(cls.sharded_granularities) <= EVERY_GRANULARITY:
            problems.append(f"sharded_granularities must be among {sorted(EVERY_GRANULARITY)}")
        if problems:
            raise QatbenchError(f"method class {cls.__qualname__}: " + "; ".join(problems))

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
        self.sharded = is_sharded(Method.quantized_params(self))  # FSDP: each rank holds shards of the tensors

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

    def level_indices(self) -> Tensor | None:
        """The level index (uint8) of every quantized latent weight, flat, for the transition diagnostics;
        None while there are no levels."""
        return None

    def distance_to_levels(self) -> Tensor | None:
        """`sum |w - Q(w)|` over every quantized latent weight (a device scalar), or None."""
        return None

    def level_tables(self) -> list[Tensor]:
        """After `finalize()`: the level table `(rows, m)` of each tensor of `quantized_params()` (in that
        order), whose entries the tensor's weights now are; what the export stores."""
        return []

    def memory_tensors(self) -> list[Tensor]:
        """Every tensor the method keeps besides its `state_dict()` (index tensors, derived tables, buffers),
        so that the training state's bytes count them too."""
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


def scales_group(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's parameter group of learned steps (made by the harness where a run learns steps)."""
    for group in optimizer.param_groups:
        if group.get("scales"):
            return group
    raise QatbenchError("a method that learns steps needs the optimizer's 'scales' group (qatbench.step builds it)")


class ProxMethod(Method):
    """`QuantOptimizer(base_optimizer, quantizer, prox_map)` of the PARQ paper (Jin et al., ICML 2025).

    Each step, for the quantized weights with latent values `w` and model values `p`:
    (1) restore `p <- w`; (2) base optimizer step on `w`, with the gradient that was
    taken at the quantized/relaxed weights; (3) save `w <- p`; (4) every
    `quant_period` steps re-estimate Q from `w`; (5) set `p <- prox(w, Q, t)`.
    STE, BinaryRelax and PARQ differ only in `prox`.

    A method states its rule per tensor in `prox(latent, levels, t) -> Tensor`: one tensor's
    latent rows, their level table, the step; the simple hook a contributor writes. The
    built-in methods also override `prox_flat`, the same rule over every quantized weight at
    once: the weights live in flat buffers (`qatbench.flat`: the model's parameters are views
    into one, the latent weights are a second, the tables are per row), so a step is a fixed
    number of whole-buffer operations, whatever the number of tensors. Once QAT starts, the
    base optimizer's quantized parameters are views of the latent buffer and receive the
    gradient taken at `p` before each step, so (1) and (3) are no copies at all: the base
    optimizer updates `w` where it lies (the same arithmetic, bit for bit). Memory: one
    latent copy of the quantized weights, the level tables, and a 4-byte row index per
    quantized weight.
    """

    Config: ClassVar[type] = ProxConfig

    def __init__(self, config: ProxConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        assert quantizer is not None, "a quantizing method needs a quantizer"
        self.warmup_steps = resolve_point(config.warmup, total_steps, "warmup")
        self.params = Method.quantized_params(self)  # the model's, before the optimizer holds latent copies
        self.layout = FlatLayout([local(p.detach()) for p in self.params], quantizer.granularity, self.sharded)
        self.quant = Quantizer(quantizer, self.layout)
        self.weights = alias(self.params, self.layout)  # the model's quantized weights, flat (None: copied)
        self.param_views = [local(p.detach()) for p in self.params]  # under FSDP: this rank's shards
        self.output = self.weights  # where prox writes the model's weights (a staging buffer when copied)
        self.output_views: list[Tensor] = []
        self.latent_flat: Tensor | None = None  # the latent weights, flat, once QAT has started
        self.latent_views: list[Tensor] = []
        self.latent_params: list[torch.nn.Parameter] = []  # what the base optimizer updates during QAT
        self.flat_levels: FlatLevels | None = None
        self.learned = quantizer.scale == "learned"
        self.weight_steps: torch.nn.Parameter | None = None  # learned steps, one per row, trained (LSQ)
        self.frozen_steps: Tensor | None = None  # learned steps set once when QAT starts and kept (TALR)
        if self.learned and not self.freezes_weight_steps:
            self.weight_steps = torch.nn.Parameter(torch.ones(self.layout.num_rows, dtype=self.layout.dtype,
                                                              device=self.layout.device))
            scales_group(optimizer)["params"].append(self.weight_steps)
            q_p = -self.quant.first - 1
            self.gradient_scale = (self.layout.row_lengths.to(self.layout.dtype) * q_p).rsqrt_()  # LSQ's g per row
            self.weight_gradient = self.layout.empty()  # dL/dp, flat

    def quantized_params(self) -> list[Tensor]:
        """The model's quantized parameters (during QAT the optimizer holds their latent copies instead)."""
        return self.params

    @property
    def latent(self) -> list[Tensor]:
        """The latent weights of each quantized tensor (views, in its shape); empty before QAT starts."""
        return self.latent_views if self.latent_flat is not None else []

    @property
    def levels(self) -> list[Tensor]:
        """The level table `(rows, m)` of each quantized tensor (views); empty before the first estimate."""
        return self.layout.table_views(self.flat_levels.table) if self.flat_levels is not None else []

    # -- the proximal map ------------------------------------------------------------
    @abstractmethod
    def prox(self, latent: Tensor, levels: Tensor, t: int) -> Tensor:
        """The model weights for one tensor's latent rows `latent` `(rows, cols)` and their level table
        `levels` `(rows, m)`, at training step `t`. `t` counts from the start of training, warm-up
        included, as the PARQ reference's `step_count`, so schedule points mean the same with or without
        a warm-up."""

    def prox_flat(self, latent: Tensor, t: int, out: Tensor) -> None:
        """`prox` of every quantized weight, written into the flat buffer `out` (`latent` is flat too). This
        default calls `prox` tensor by tensor; the built-in methods override it with whole-buffer operations."""
        tables = self.layout.table_views(self.flat_levels.table)
        for rows, table, out_rows in zip(self.layout.row_views(latent), tables, self.layout.row_views(out)):
            out_rows.copy_(self.prox(rows, table, t))

    def nearest_level(self, latent: Tensor, levels: Tensor) -> Tensor:
        """For a `prox` hook: the nearest level of every weight of one tensor's rows in their table, rounded the
        way the method's quantizer rounds (`qatbench.quant`: closed form for uniform levels, ties down)."""
        return hard_quantize(latent, levels, evenly_spaced=self.quantizer.evenly_spaced,
                             integer=self.quantizer.integer_grid)

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

    @property
    def qat_started(self) -> bool:
        """Whether QAT has started: the latent weights and their levels exist (`refresh_levels` may be called)."""
        return self.latent_flat is not None

    def refresh_due(self, t: int) -> bool:
        """Whether to re-estimate the levels at QAT step t (TALR freezes them after the first); learned steps
        change every step."""
        return self.weight_steps is not None or t % self.config.quant_period == 0

    # -- the step ----------------------------------------------------------------------
    def _start_qat(self) -> None:
        """Keep the latent weights (a copy of the model's when QAT starts) and let the base optimizer update
        them from now on: its quantized parameters become views of the latent buffer, with their state."""
        self.latent_flat = self.layout.empty()
        self.latent_views = self.layout.views(self.latent_flat)
        torch._foreach_copy_(self.latent_views, self.param_views)
        if self.weights is None:
            self.output = self.layout.empty()
            self.output_views = self.layout.views(self.output)
        self.latent_params = [torch.nn.Parameter(view) for view in self.latent_views]
        replace = dict(zip(map(id, self.params), self.latent_params))
        for group in self.optimizer.param_groups:
            if group.get("quant"):
                group["params"] = [replace.get(id(p), p) for p in group["params"]]
        for p, latent in zip(self.params, self.latent_params):
            if p in self.optimizer.state:  # under FSDP the latent weights are shards: so is their state
                self.optimizer.state[latent] = {k: local(v) for k, v in self.optimizer.state.pop(p).items()}
        if self.learned:  # where the learned steps start: from the weights as QAT starts
            initial = self.quant.initial_steps(self.latent_flat)
            if self.weight_steps is not None:
                self.weight_steps.data.copy_(initial)
            else:
                self.frozen_steps = initial

    def _lsq_gradients(self) -> None:
        """LSQ (Esser et al., ICLR 2020) on the weights' integer grid `k s`: the steps' gradient
        `ds = g sum_i dL/dp_i (round(u_i) - u_i)` over each row (`u = w / s` strictly inside the clip range
        `(c_0, c_{m-1})`; `c_0` or `c_{m-1}` at or beyond its ends), `g = 1 / sqrt(N Q_P)` (N: the row's weights),
        and the weights' gradient zeroed at and beyond the ends (the LSQ paper's; `round` is the shared
        quantizer's, ties down)."""
        gradient, steps = self.weight_gradient, self.flat_levels.element_steps
        torch._foreach_copy_(self.layout.views(gradient), [local(p.grad) for p in self.params])
        u = self.latent_flat / steps
        low, high = self.quant.first, self.quant.first + self.quant.m - 1
        inside = (u > low) & (u < high)
        slope = torch.where(inside, self.quant.indices(self.latent_flat, self.flat_levels).add_(low).sub_(u),
                            u.clamp_(low, high))
        self.weight_steps.grad = self.layout.row_reduce(slope.mul_(gradient), "sum").mul_(self.gradient_scale)
        torch._foreach_copy_([local(p.grad) for p in self.params], self.layout.views(gradient.mul_(inside)))
    def _update_latent(self) -> None:
        """The base optimizer's step on the latent weights, with the gradients taken at the model's weights."""
        for latent, p in zip(self.latent_params, self.params):
            latent.grad = local(p.grad)
        self.base_step()
        for latent in self.latent_params:
            latent.grad = None

    def zero_grad(self) -> None:
        super().zero_grad()
        for p in self.params:  # during QAT the optimizer holds the latent copies, not the model's weights
            p.grad = None

    def _publish(self) -> None:
        """Where the model's parameters are not views of the output buffer (FSDP's shards), copy it into them."""
        if self.weights is None:
            torch._foreach_copy_(self.param_views, self.output_views)

    def refresh_levels(self) -> None:
        """Re-estimate the level table of every row from the latent weights; with learned steps, the integer grid
        of the steps (kept positive)."""
        if not self.learned:
            self.flat_levels = self.quant.levels(self.prox_input(self.latent_flat))
            return
        steps = self.frozen_steps if self.weight_steps is None else self.weight_steps.data
        self.flat_levels = self.quant.levels_of_steps(steps.clamp_(min=2 * torch.finfo(steps.dtype).tiny))

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        t = self.steps - self.warmup_steps  # QAT step index
        if t < 0:
            self.optimizer.step()
        else:
            if self.latent_flat is None:  # first QAT step: the model still holds the latent weights
                self._start_qat()
            else:
                if self.weight_steps is not None:
                    self._lsq_gradients()  # from the straight-through gradient, before a method replaces it
                self.estimate_gradients(closure)
            self._update_latent()
            self.on_base_step()
            if self.refresh_due(t):
                self.refresh_levels()
            self.prox_flat(self.prox_input(self.latent_flat), self.steps, self.output)
            self._publish()
        self.steps += 1

    @torch.no_grad()
    def finalize(self) -> None:
        """Hard-quantize: `p <- Q[nearest(w)]` with the levels the model trained with."""
        if self.latent_flat is None:  # QAT never started (training shorter than the warm-up)
            self._start_qat()
            self.refresh_levels()
        self.hard_quantize(self.prox_input(self.latent_flat), out=self.output)
        self._publish()

    def hard_quantize(self, values: Tensor, out: Tensor | None = None) -> Tensor:
        """`Q[nearest(w)]` of a flat buffer, with the current levels (bitwise entries of the tables)."""
        return self.quant.hard_quantize(values, self.flat_levels, out=out)

    @torch.no_grad()
    def level_indices(self) -> Tensor | None:
        if self.latent_flat is None or self.flat_levels is None:
            return None
        return self.quant.indices(self.prox_input(self.latent_flat), self.flat_levels).to(torch.uint8)

    @torch.no_grad()
    def distance_to_levels(self) -> Tensor | None:
        if self.latent_flat is None or self.flat_levels is None:
            return None
        values = self.prox_input(self.latent_flat)
        return (values - self.hard_quantize(values)).abs_().sum()

    def level_tables(self) -> list[Tensor]:
        return self.levels

    def memory_tensors(self) -> list[Tensor]:
        levels, quant = self.flat_levels, self.quant
        derived = [t for t in (levels.element_steps, levels.bounds, levels.padded) if t is not None] if levels else []
        staging = [self.output] if self.weights is None and self.output is not None else []
        if self.weight_steps is not None:
            staging += [self.weight_gradient, self.gradient_scale]
        constants = [t for t in (quant.row_start, quant.signs) if t is not None]
        return [self.layout.row_lengths, self.layout.tensor_numels, quant.coefficients, quant.row_counts, *constants,
                *derived, *staging]

    def state_dict(self) -> dict[str, Any]:
        levels = self.flat_levels
        return {**super().state_dict(), "latent": self.latent_flat, "levels": None if levels is None else levels.table,
                "level_steps": None if levels is None else levels.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["latent"] is not None:  # QAT had started: the optimizer's state belongs to the latent weights
            if self.latent_flat is None:
                self._start_qat()
            self.latent_flat.copy_(state["latent"])
            steps = None if state["level_steps"] is None else state["level_steps"].to(self.device, copy=True)
            if self.learned:  # the steps the levels are the grid of
                if self.weight_steps is not None:
                    self.weight_steps.data.copy_(steps)
                    steps = self.weight_steps.data
                else:
                    self.frozen_steps = steps
            self.flat_levels = make_levels(state["levels"].to(self.device), steps, self.layout)
        super().load_state_dict(state)
