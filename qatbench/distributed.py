"""One run on several processes: `torchrun --nproc-per-node N -m qatbench run ...` (DDP; FSDP2 for `--fsdp`).

torchrun (or submitit on SLURM) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `init_distributed` joins them in one process group (NCCL on
CUDA, gloo on the CPU). Every rank trains; rank 0 alone takes the run's lock, writes
checkpoints, exports and records. What every rank must agree on (whether a run is skipped,
whether to checkpoint or stop now) is decided by collectives, never by a rank's own clock.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from .errors import QatbenchError


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes that train one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes of the run on this node

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_environment() -> World:
    """The World that torchrun (or submitit's TorchDistributedEnvironment) describes in the environment."""
    try:
        size = int(os.environ.get("WORLD_SIZE", 1))
        return World(int(os.environ.get("RANK", 0)), size, int(os.environ.get("LOCAL_RANK", 0)),
                     int(os.environ.get("LOCAL_WORLD_SIZE", size)))
    except ValueError:
        raise QatbenchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None


def init_distributed(world: World, device_text: str) -> str:
    """Join the process group of a multi-process run (NCCL on CUDA, gloo on the CPU), and return the device
    this rank trains on: `cuda:LOCAL_RANK` for a CUDA run, else `device_text`."""
    if not world.distributed:
        return device_text
    cuda = device_text.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available() or world.local_rank >= torch.cuda.device_count():
            raise QatbenchError(f"rank {world.rank} needs cuda:{world.local_rank}, but "
                                f"{torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{world.local_rank}" if cuda else device_text


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """`values` reduced over every rank (sum or max); themselves in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def reduce_tensor_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a tensor in place (sum, avg or max) when several ranks train, no-op otherwise; returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "avg": dist.ReduceOp.SUM}[op])
        if op == "avg":
            tensor.div_(dist.get_world_size())
    return tensor


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others): what only rank 0 writes."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
