"""Mini-batch iterators that can stop anywhere inside an epoch and resume there exactly.

Each iterator yields one epoch per `iter()`. `state_dict()` is where the current epoch
stands (its order and how many batches were taken); after `load_state_dict(state)` the
next `iter()` continues that epoch at the next batch instead of starting a new one (the
harness restores it only for a run stopped inside an epoch). An iterator whose order is a
function of the epoch's number has `set_epoch(e)`, which the harness calls before each
epoch. Together with the generators' states (saved by the harness), a resumed run draws
the same batches, augmented the same way, as a run that was never stopped.

`shard(rank, world)` makes an iterator yield rank `rank`'s part of each global batch (the
`torch.tensor_split` of the batch into `world` parts), so that the ranks of a data-parallel
run together see exactly the batches, and augmentations, of a single process.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import torch
from torch import Tensor

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def rank_part(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rank `rank`'s part of a global batch (along dim 0): contiguous, every row in exactly one part."""
    return batch if world == 1 else torch.tensor_split(batch, world)[rank]


class TensorBatches:
    """Mini-batches of device-resident tensors, reshuffled each epoch by a seeded generator.

    The whole data set lives on the run's device; a batch is an index into it, so
    no per-sample Python work happens during training. `transform(inputs, targets)`
    runs on each whole batch on the device (augmentation, normalization, dtype).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
    ) -> None:
        self.inputs, self.targets = inputs, targets
        self.batch_size = batch_size
        self.shuffle, self.generator, self.drop_last = shuffle, generator, drop_last
        self.transform = transform
        self.rank, self.world = 0, 1
        self._order: Tensor | None = None  # the current epoch's order (shuffled epochs only)
        self._position = 0  # batches taken from the current epoch
        self._resume = False

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.targets)
        device = self.targets.device
        if not self._resume:
            self._position = 0
            self._order = (torch.randperm(n, generator=self.generator, device=self.generator.device).to(device)
                           if self.shuffle else None)
        self._resume = False
        order = self._order if self._order is not None else torch.arange(n, device=device)
        while self._position < len(self):
            i = self._position
            self._position += 1
            index = order[i * self.batch_size: (i + 1) * self.batch_size]
            if self.transform is None:  # nothing random per batch: gather this rank's part only
                index = rank_part(index, self.rank, self.world)
                yield self.inputs[index], self.targets[index]
                continue
            inputs, targets = self.transform(self.inputs[index], self.targets[index])  # as one process draws it
            yield rank_part(inputs, self.rank, self.world), rank_part(targets, self.rank, self.world)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = state["order"]
        self._order = None if order is None else order.to(self.targets.device)
        self._position, self._resume = int(state["position"]), True


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of a data set's indices in a fresh order each epoch, each index paired with its sample seed.

    Epoch e's order is `randperm(n)` under a generator seeded with (seed, e), so it needs no
    state but the epoch; the seed of sample i in epoch e is a function of (seed, e, i), so
    a sample's random augmentation does not depend on which worker loads it, on which rank,
    in what order, or whether the run was stopped and resumed (`SeededSamples` applies it).
    Batches from `start` on are yielded (where a resumed run continues), each reduced to
    this rank's part.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool) -> None:
        self.size, self.batch_size, self.seed, self.shuffle, self.drop_last = size, batch_size, seed, shuffle, drop_last
        self.epoch, self.start, self.rank, self.world = 0, 0, 0, 1

    def batches(self) -> int:
        """Global batches in an epoch."""
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def __len__(self) -> int:
        return self.batches() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        base = (self.seed * 1_000_003 + self.epoch) * 2**24
        for b in range(self.start, self.batches()):
            part = rank_part(order[b * self.batch_size: (b + 1) * self.batch_size], self.rank, self.world).tolist()
            if part:
                yield [(i, (base + i) % 2**63) for i in part]


class SeededSamples(torch.utils.data.Dataset):
    """`dataset[i]` computed with torch's, Python's and numpy's random generators seeded for that sample
    (keys are `(index, seed)` pairs from an `EpochSampler`); the caller's generator states are restored."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        python_state, numpy_state = random.getstate(), numpy.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            numpy.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                numpy.random.set_state(numpy_state)


class DeviceLoader:
    """A `torch.utils.data.DataLoader` over an `EpochBatchSampler` (for data sets too large for device memory)
    whose batches arrive on `device`, optionally transformed there (mixup, CutMix); resumable and shardable
    through its sampler. `waited_s` is the time spent waiting for the loader's worker processes (the harness
    reports it as the run's data wait); device-resident batches (`TensorBatches`) never wait and have none."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device,
                 transform: BatchTransform | None = None) -> None:
        if not isinstance(loader.batch_sampler, EpochBatchSampler):
            raise TypeError("DeviceLoader needs a DataLoader whose batch_sampler is an EpochBatchSampler")
        self.loader, self.device, self.transform = loader, device, transform
        self.sampler: EpochBatchSampler = loader.batch_sampler
        self._position = 0
        self._resume = False
        self.waited_s = 0.0

    def shard(self, rank: int, world: int) -> None:
        self.sampler.rank, self.sampler.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        """The next epoch's number, which chooses its order and its samples' seeds."""
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return self.sampler.batches()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self._resume:
            self._position = 0
        self.sampler.start = self._position
        self._resume = False
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                inputs, targets = next(batches)
            except StopIteration:
                return
            self.waited_s += time.perf_counter() - start
            self._position += 1
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            yield self.transform(inputs, targets) if self.transform else (inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position, self._resume = int(state["position"]), True
