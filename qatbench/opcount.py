"""How many operations a method's step dispatches: on a GPU each is at least one kernel launch, and a small
model's step is bound by launches, not arithmetic.

Counted with a `TorchDispatchMode`, which sees every aten operation once (a foreach operation over many
tensors is one). The counts are split into the method's own operations, those of the forward passes it
makes through its closure (FOGZO's probes), and reads of a device value into Python
(`aten::_local_scalar_dense`, what `.item()` dispatches): a step with none of those never waits on the
device and can be captured in a CUDA graph.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ = "aten._local_scalar_dense.default"


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, per phase (`step` unless `during` says so)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.phase = "step"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[self.phase][str(func)] += 1
        return func(*args, **(kwargs or {}))

    def during(self, phase: str, fn: Callable[[], Any]) -> Any:
        previous, self.phase = self.phase, phase
        try:
            return fn()
        finally:
            self.phase = previous

    def total(self, phase: str) -> int:
        return sum(self.counts[phase].values())

    def host_reads(self, phase: str | None = None) -> int:
        """Values read from tensors into Python, in `phase` or in every phase."""
        counters = [self.counts[phase]] if phase is not None else list(self.counts.values())
        return sum(counter[HOST_READ] for counter in counters)


@dataclasses.dataclass
class StepOps:
    """The operations of one method step (outside a level refresh) and of one level refresh."""

    step: int  # the method's own, the base optimizer's included
    base: int  # the same base optimizer's foreach step alone
    probes: int  # the forward passes made through the closure
    refresh: int | None  # one level refresh (None for a method without levels)
    host_reads: int  # tensor values read into Python by the step itself (the probes' forwards apart)

    @property
    def extra(self) -> int:
        return self.step - self.base


def count_step(step: Callable[[Any], None], closure: Callable[[], torch.Tensor] | None) -> DispatchCounter:
    """The operations of `step(closure)` (a method's step, the gradients set), the closure's counted apart."""
    counter = DispatchCounter()
    probe = None if closure is None else (lambda: counter.during("probes", closure))
    with counter:
        step(probe)
    return counter


def base_step_ops(optimizer: torch.optim.Optimizer) -> int:
    """The operations of one foreach step of an optimizer like `optimizer` (its groups and their options) over
    copies of its parameters (a second step: the first makes the state)."""
    groups = []
    for group in optimizer.param_groups:
        params = [copy.deepcopy(p.detach()).requires_grad_() for p in group["params"]]
        for p in params:
            p.grad = torch.ones_like(p)
        groups.append({**{k: v for k, v in group.items() if k not in ("params", "fused")}, "params": params,
                       "foreach": True})
    twin = type(optimizer)(groups)
    twin.step()
    counter = DispatchCounter()
    with counter:
        twin.step()
    return counter.total("step")


HOST_DATA = "aten.lift_fresh.default"  # a tensor made from Python data (on CUDA, a copy from the host)


def count_refresh(method: Any) -> DispatchCounter | None:
    """The operations of one level refresh of every quantized tensor, or None without levels."""
    if not getattr(method, "qat_started", False):
        return None
    counter = DispatchCounter()
    with counter, torch.no_grad():
        method.refresh_levels()
    return counter


def refresh_ops(method: Any) -> int | None:
    """The number of operations of one level refresh, or None without levels."""
    counter = count_refresh(method)
    return None if counter is None else counter.total("step")


def use_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Make the base optimizer take its foreach path (the default on CUDA), as counted against."""
    for group in optimizer.param_groups:
        group["foreach"] = True
