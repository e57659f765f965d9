"""FSDP2 for one run on several processes (`--fsdp`): parameters, gradients and optimizer state sharded.

`torch.distributed.fsdp.fully_shard` turns each of the task's shard units (a LLaMA's decoder
layers) and the model into FSDP modules: every parameter becomes a DTensor whose rows (dim 0)
are split over the ranks, all-gathered for each unit's forward and backward, its gradient
reduce-scattered. What this module adds for QAT:

* `local(t)`: a rank's own shard of a DTensor (a view: writes reach FSDP's storage); the
  methods keep their flat buffers over these shards (`qatbench.flat`), so a per-channel row
  (a row of dim 0) lies whole on one rank, and only statistics of rows or tensors that span
  ranks are all-reduced;
* `whole_weights(model)`: the whole weights on every rank for a while (evaluation, the
  exactness check), with no collective inside, so ranks may run different numbers of forwards
  (their parts of the held-out split differ); `whole_state_dict` gathers them for the export;
* checkpoints of shards: `local_state` / `load_local_state` / `restore_optimizer_shards`, each rank
  saving and restoring its own part (resumed on as many processes);
* `whole_level_tables`: the per-row level tables of every rank, in row order, for the export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .distributed import World, gather
from .errors import QatbenchError


def local(tensor: Tensor | None) -> Tensor | None:
    """This rank's shard of a sharded (DTensor) tensor, as a view of it; any other tensor (or None) itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensors: list[Tensor]) -> bool:
    """Whether `tensors` are DTensors (FSDP's sharded parameters)."""
    return any(isinstance(t, DTensor) for t in tensors)


def shard_model(model: nn.Module, units: list[nn.Module], quantized: list[str], world: World,
                device: torch.device) -> None:
    """Apply FSDP2 to each of `units` and then to `model` (what is left: embeddings, head, final norm), over a
    one-dimensional mesh of the world's ranks on `device`'s type. Every quantized tensor must be a matrix with at
    least one row on each rank (FSDP splits dim 0 as `torch.chunk`: ceil(rows / ranks) rows a rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for name in quantized:
        shape = model.get_parameter(name).shape
        if len(shape) < 2:
            raise QatbenchError(f"--fsdp: the quantized tensor {name} of shape {tuple(shape)} is not a matrix, whose "
                                f"rows FSDP could split; train it without --fsdp")
        if -(-shape[0] // world.size) * (world.size - 1) >= shape[0]:
            raise QatbenchError(f"--fsdp: the quantized tensor {name} of shape {tuple(shape)} would leave some of the "
                                f"{world.size} processes without a row of it; train it on fewer or without --fsdp")
    mesh = init_device_mesh(device.type, (world.size,))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_weights(model: nn.Module) -> Iterator[None]:
    """Inside: the model's parameters are the whole (all-gathered) tensors on every rank, plain tensors, and
    forwards make no collective call. Writes to them are not kept. Afterwards each unit reshards after its
    forward again, the root not (FSDP's defaults, as `shard_model` applies them). Outside FSDP: nothing happens."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)


def whole_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict of whole tensors: its own outside FSDP; under FSDP gathered into rank 0's memory
    (the other ranks get an empty dict), a collective that every rank calls."""
    if not _fsdp_modules(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def gradient_sync_paused(model: nn.Module) -> Iterator[None]:
    """FSDP's `no_sync`: backwards inside leave their gradients unreduced (accumulated on each rank)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_state(value: Any) -> Any:
    """`value` (nested dicts, lists and tensors) with every DTensor replaced by a CPU copy of this rank's shard
    and every other tensor by a CPU copy: what a rank's part of a checkpoint holds."""
    if isinstance(value, Tensor):
        return local(value).detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: local_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local_state(v) for v in value)
    return value


@torch.no_grad()
def load_local_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a rank's saved shards (`local_state(model.state_dict())`) into the model's shards, key by key."""
    current = model.state_dict()
    if set(current) != set(state):
        raise QatbenchError("the checkpoint's model does not match this model's parameters")
    for key, tensor in current.items():
        local(tensor).copy_(state[key])


def restore_optimizer_shards(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of shards: the state of each sharded parameter back to DTensors laid out
    as the parameter (loading made them plain tensors of the shard's shape); scalars such as `step` stay plain."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == p.to_local().shape:
                    state[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                                    shape=p.shape, stride=p.stride())


def whole_level_tables(tables: list[Tensor], rows_span_ranks: bool) -> list[Tensor]:
    """Every rank's level tables `(rows, m)` of each quantized tensor, as one table of the whole tensor: rank 0's
    where the rows span the ranks (per-tensor levels, from all-reduced statistics: the same on each), else the
    ranks' rows in rank order (FSDP shards dim 0 in order). A collective: every rank calls it."""
    every = gather([t.detach().cpu() for t in tables])
    return every[0] if rows_span_ranks else [torch.cat(parts) for parts in zip(*every)]
