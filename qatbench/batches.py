"""Mini-batch iterators that can stop anywhere inside an epoch and resume there exactly.

Each iterator yields one epoch per `iter()`. `state_dict()` is where the current epoch
stands (its order and how many batches were taken); after `load_state_dict(state)` the
next `iter()` continues that epoch at the next batch instead of starting a new one.
Together with the generators' states (saved by the harness), a resumed run draws the
same batches, augmented the same way, as a run that was never stopped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import torch
from torch import Tensor

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


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
        self._order: Tensor | None = None  # the current epoch's order (shuffled epochs only)
        self._position = 0  # batches taken from the current epoch
        self._resume = False

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
            inputs, targets = self.inputs[index], self.targets[index]
            yield self.transform(inputs, targets) if self.transform else (inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = state["order"]
        self._order = None if order is None else order.to(self.targets.device)
        self._position, self._resume = int(state["position"]), True


class EpochSampler(torch.utils.data.Sampler):
    """Indices of a data set in a fresh order each epoch, each paired with its own sample seed.

    Epoch e's order is `randperm(n)` under a generator seeded with (seed, e), so it needs no
    state but the epoch; the seed of sample i in epoch e is a function of (seed, e, i), so
    a sample's random augmentation does not depend on which worker loads it, in what order,
    or whether the run was stopped and resumed (`SeededSamples` applies it). `start` skips
    that many samples of the epoch: where a resumed run continues.
    """

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        base = (self.seed * 1_000_003 + self.epoch) * 2**24
        for position in range(self.start, self.size):
            yield order[position], (base + order[position]) % 2**63


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
    """A `torch.utils.data.DataLoader` (for data sets too large for device memory) whose batches arrive
    on `device`, optionally transformed there (mixup, CutMix); resumable through its `EpochSampler`."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device,
                 transform: BatchTransform | None = None) -> None:
        self.loader, self.device, self.transform = loader, device, transform
        sampler = loader.sampler if isinstance(loader.sampler, EpochSampler) else None
        self.sampler = sampler
        self.batch_size = loader.batch_size or 1
        self._position = 0
        self._resume = False
        self._epochs_begun = 0

    def __len__(self) -> int:
        return len(self.loader.dataset) // self.batch_size if self.loader.drop_last else \
            math.ceil(len(self.loader.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.sampler is not None:
            if not self._resume:
                self.sampler.epoch, self._position = self._epochs_begun, 0
                self._epochs_begun += 1
            self.sampler.start = self._position * self.batch_size
        self._resume = False
        for inputs, targets in self.loader:
            self._position += 1
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            yield self.transform(inputs, targets) if self.transform else (inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        epoch = self.sampler.epoch if self.sampler is not None else 0
        return {"epoch": epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler is not None:
            self.sampler.epoch = int(state["epoch"])
            self._epochs_begun = self.sampler.epoch + 1
        self._position, self._resume = int(state["position"]), True
