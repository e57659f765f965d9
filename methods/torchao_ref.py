"""The PARQ authors' reference implementation (`torchao.prototype.parq`) as methods that run beside qatbench's own.

`torchao-ste`, `torchao-binaryrelax` and `torchao-parq` wrap the reference's
`QuantOptimizer(base_optimizer, quantizer, prox_map)` (Jin et al., ICML 2025; torchao, BSD-3) with the
reference's own quantizers (`UnifQuantizer`, `TernaryUnifQuantizer`, `LSBQuantizer`) and proximal maps
(`ProxHardQuant`, `ProxBinaryRelax`, `ProxPARQ`), set exactly as qatbench's `ste`, `binaryrelax` and `parq`
are: the same level set, granularity and bits, the same warm-up, `quant_period`, annealing points, steepness,
centre and `quant_shrink`, so that a sweep puts both in one table and `tests/methods/test_reference.py` holds
qatbench's trajectories to the reference's. `finalize()` hard-quantizes the latent weights with the reference's
own `ProxHardQuant` and its last levels, which are also what the export packs. The reference runs as it is:
from 3 bits its greedy LSBQ hard-quantizes at refresh steps to the greedy expansion, which is not always the
nearest level (qatbench's `lsbq` takes the nearest at every step; `tests/methods/test_reference.py`). Needs the extra
`pip install -e '.[ref]'` (torchao); without it the names are listed with that hint. Not served: FSDP (the
reference's DTensor path is not this harness's), learned steps, PARQ's AProx schedule (the reference has no
such prox map): one-line errors.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
from torch import Tensor

from qatbench.errors import QatbenchError
from qatbench.method import Closure, Method, ProxConfig
from qatbench.methods.binaryrelax import BinaryRelaxConfig
from qatbench.methods.parq import PARQConfig
from qatbench.params import param
from qatbench.quant import TERNARY, level_indices
from qatbench.registry import METHODS
from qatbench.schedules import resolve_point

EXTRA = "pip install -e '.[ref]' (the PARQ authors' reference, torchao)"

try:
    logging.disable(logging.WARNING)  # torchao's import logs deprecation warnings of torch's (enum registrations)
    from torchao.prototype.parq import (LSBQuantizer, ProxBinaryRelax, ProxHardQuant, ProxPARQ, QuantOptimizer,
                                        TernaryUnifQuantizer, UnifQuantizer)
except ImportError:  # the extra is optional: the names are listed with the hint
    QuantOptimizer = None
finally:
    logging.disable(logging.NOTSET)


class ReferenceMethod(Method):
    """The reference's `QuantOptimizer` around the run's base optimizer, quantizer and a proximal map."""

    Config = ProxConfig
    peer_of = ""  # the qatbench method whose rule this one runs (qatbench bench compares the two)

    def __init__(self, config: Any, optimizer: torch.optim.Optimizer, quantizer, total_steps: int,
                 generator: torch.Generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.params = Method.quantized_params(self)
        bits = quantizer.bits
        for group in optimizer.param_groups:
            if group.get("quant"):
                group["quant_bits"] = bits  # which groups the reference quantizes (ternary: 0, as qatbench's)
        if quantizer.scheme == "lsbq":
            reference_quantizer = LSBQuantizer()  # greedy; ternary: 1.1 mean|w|, as qatbench's
        elif bits == TERNARY:
            reference_quantizer = TernaryUnifQuantizer()
        else:
            reference_quantizer = UnifQuantizer()  # q_max = min(b mean|w|, max|w|), levels (k - (2^b-1)/2) s
        self.reference_quantizer = reference_quantizer
        self.warmup_steps = resolve_point(config.warmup, total_steps, "warmup")
        self.reference = QuantOptimizer(optimizer, reference_quantizer, self.prox_map(total_steps),
                                        warmup_steps=self.warmup_steps, quant_period=config.quant_period,
                                        quant_per_channel=quantizer.granularity == "channel",
                                        quant_shrink=getattr(config, "quant_shrink", False))
        self.tables: list[Tensor] = []

    def prox_map(self, total_steps: int) -> Any:
        raise NotImplementedError

    def anneal_points(self, total_steps: int) -> tuple[int, int]:
        """The reference's annealing interval `[start, end)` in steps (it needs start < end)."""
        start = resolve_point(self.config.anneal_start, total_steps, "anneal_start")
        return start, max(start + 1, resolve_point(self.config.anneal_end, total_steps, "anneal_end"))

    @property
    def qat_started(self) -> bool:
        return "latent" in self.reference.state[self.params[0]]

    def refresh_due(self, t: int) -> bool:
        """Whether the reference re-estimates its levels at QAT step t."""
        return t % self.config.quant_period == 0

    @torch.no_grad()
    def refresh_levels(self) -> None:
        """The reference's refresh as its `QuantOptimizer.step` makes it (a new table, the levels of each latent
        tensor), for `qatbench bench` to time."""
        for p in self.params:
            state = self.reference.state[p]
            per_channel = self.quantizer.granularity == "channel" and p.dim() > 1
            latent = state["latent"].flatten(start_dim=1) if per_channel else state["latent"]
            state["quants"] = torch.empty_like(state["quants"])
            self.reference.quantize_(latent / self._shrink(), state["quants"], self.reference_quantizer,
                                     self.quantizer.bits, dim=-1 if per_channel else None)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        self.reference.step()  # the probe closure is for methods that re-evaluate the loss; this one does not
        self.steps += 1

    def _rows(self, tensor: Tensor) -> Tensor:
        return tensor.reshape(tensor.shape[0], -1) if self.quantizer.granularity == "channel" and tensor.dim() > 1 \
            else tensor.reshape(1, -1)

    def _shrink(self) -> float:
        """The reference's AProx shrinkage `gamma = max(1, sum of lr)` when `quant_shrink` (it quantizes w / gamma),
        else 1."""
        if not self.reference.quant_shrink:
            return 1.0
        group = next(g for g in self.reference.param_groups if g.get("quant_bits", 16) < 16)
        return max(1.0, group.get("cumu_lr", 0.0))

    def _latent_and_levels(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(parameter, latent rows as the reference quantizes them, level table rows) of every quantized tensor,
        once QAT has started."""
        state, gamma = self.reference.state, self._shrink()
        out = []
        for p in self.params:
            if "latent" not in state[p] or "quants" not in state[p]:
                return []
            quants = state[p]["quants"]
            out.append((p, self._rows(state[p]["latent"]) / gamma,
                        quants.reshape(1, -1) if quants.dim() == 1 else quants))
        return out

    @torch.no_grad()
    def finalize(self) -> None:
        """`p <- Q[nearest(w)]` with the reference's `ProxHardQuant` and its last levels (where QAT never started,
        the reference quantizer's levels of the weights as they are)."""
        self.tables, gamma = [], self._shrink()
        for p in self.params:
            state, rows = self.reference.state[p], self._rows(p.data)
            dim = -1 if self.quantizer.granularity == "channel" and p.dim() > 1 else None
            if "latent" in state and "quants" in state:
                rows.copy_(self._rows(state["latent"]) / gamma)  # what the reference quantizes: w / gamma
                table = state["quants"]
            else:
                table = self.reference_quantizer.quantize(rows if dim else p.data, self.quantizer.bits, dim=dim)[1]
            ProxHardQuant().apply_(rows if dim else p.data, None, table, 0, dim=dim)
            self.tables.append((table.reshape(1, -1) if table.dim() == 1 else table).clone())

    def level_tables(self) -> list[Tensor]:
        return self.tables

    @torch.no_grad()
    def level_indices(self) -> Tensor | None:
        pairs = self._latent_and_levels()
        if not pairs:
            return None
        return torch.cat([level_indices(latent, table, self.quantizer.evenly_spaced).reshape(-1)
                          for _, latent, table in pairs]).to(torch.uint8)

    @torch.no_grad()
    def distance_to_levels(self) -> Tensor | None:
        pairs = self._latent_and_levels()
        if not pairs:
            return None
        indices = [level_indices(latent, table, self.quantizer.evenly_spaced) for _, latent, table in pairs]
        return sum((latent - table.gather(1, index)).abs().sum() for (_, latent, table), index in zip(pairs, indices))

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state holds the reference's latent weights and levels; its groups, the step count
        and the cumulative learning rate."""
        return {**super().state_dict(), "tables": self.tables}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tables = self._on_device(state["tables"])


def _register(name: str, cls: type, doc: str) -> None:
    cls.__doc__ = doc
    if QuantOptimizer is None:
        METHODS.unavailable(name, f"the PARQ authors' reference; {EXTRA}")
    else:
        METHODS.register(name)(cls)


class ReferenceSTE(ReferenceMethod):
    peer_of = "ste"
    def prox_map(self, total_steps: int) -> Any:
        return ProxHardQuant()


class ReferenceBinaryRelax(ReferenceMethod):
    peer_of = "binaryrelax"
    Config = BinaryRelaxConfig

    def prox_map(self, total_steps: int) -> Any:
        return ProxBinaryRelax(*self.anneal_points(total_steps))


@dataclasses.dataclass(frozen=True)
class ReferencePARQConfig(PARQConfig):
    slope_schedule: Literal["sigmoid"] = param("sigmoid", "inverse slope: the annealed mirror sigmoid (the reference "
                                                          "has no AProx; qatbench's parq has)")

    def __post_init__(self) -> None:
        if self.anneal_end == self.anneal_start:
            raise QatbenchError(f"method 'torchao-parq' argument anneal_end={self.anneal_end:g}: the reference's "
                                "ProxPARQ anneals over anneal_start < anneal_end (no annealing is torchao-ste)")


class ReferencePARQ(ReferenceMethod):
    peer_of = "parq"
    Config = ReferencePARQConfig

    def prox_map(self, total_steps: int) -> Any:
        return ProxPARQ(*self.anneal_points(total_steps), self.config.steepness, self.config.center)


_register("torchao-ste", ReferenceSTE, "STE as the reference's ProxHardQuant in its QuantOptimizer (torchao).")
_register("torchao-binaryrelax", ReferenceBinaryRelax,
          "BinaryRelax as the reference's ProxBinaryRelax in its QuantOptimizer (torchao).")
_register("torchao-parq", ReferencePARQ, "PARQ as the reference's ProxPARQ in its QuantOptimizer (torchao).")
