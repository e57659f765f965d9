"""The Task contract: data plus a recipe.

A task owns the model factory, the data, the loss, the metric, which parameters
are quantized, and its training recipes (`smoke` for tests, `short`, and `paper`
for the published budget). It never knows a method.

What the harness calls on a task's data is the `Batches` protocol (the training batches: iterate
one epoch, its length, where it stands and continue there, this rank's part of every batch;
the test batches: iterate, this rank's part); `check_batches` holds the data a task loads to it,
and `TASKS.register` checks the class itself (`Task.check_plugin`). `write_sample` writes a small
data set in the task's real on-disk format (`qatbench sample`), which the conformance tests
(`tests/tasks/test_conformance.py`) train every registered task on.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import yaml
from torch import Tensor, nn

from .data import DataSource
from .distributed import reduce_tensor_
from .errors import QatbenchError
from .params import NoConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimizer, learning-rate schedule and budget of one training run."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[int, ...] = ()  # epochs at which a "step" schedule multiplies the LR by lr_decay
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up of the LR from 0
    min_lr: float = 0.0  # where a cosine schedule ends
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    grad_clip: float = 0.0  # clip the gradient norm of all parameters to this (0: no clipping)
    cuda_precision: Literal["fp32", "bf16"] = "fp32"  # autocast on CUDA unless the run says otherwise
    epoch_steps: int = 0  # cap on the training steps of an epoch (0: the whole split); smoke recipes use it
    final_hold_epochs: int = 0  # a cosine schedule reaches min_lr this many epochs before the end and stays there

    def with_overrides(self, epochs: int | None, batch_size: int | None, lr: float | None) -> Recipe:
        changes = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def summary(self) -> str:
        """One line with the fields that matter for this recipe's optimizer and schedule."""
        optimizer = f"SGD lr {self.lr:g} momentum {self.momentum:g}" if self.optimizer == "sgd" else f"AdamW lr {self.lr:g}"
        schedule = {"cosine": f"cosine to {self.min_lr:g}" + (f", held the last {self.final_hold_epochs} epochs"
                                                               if self.final_hold_epochs else ""),
                    "step": f"LR x{self.lr_decay:g} at epochs {', '.join(map(str, self.milestones))}",
                    "constant": "constant LR"}[self.lr_schedule]
        warmup = f", {self.warmup_epochs:g} warm-up epochs" if self.warmup_epochs else ""
        clip = f", gradient norm clipped at {self.grad_clip:g}" if self.grad_clip else ""
        cuda = ", bf16 autocast on CUDA" if self.cuda_precision == "bf16" else ""
        epochs = f"{self.epochs} epochs" + (f" of at most {self.epoch_steps} steps" if self.epoch_steps else "")
        return (f"{optimizer}, wd {self.weight_decay:g}, batch {self.batch_size}, {epochs}, "
                f"{schedule}{warmup}{clip}{cuda}")

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        groups = [{"weight_decay": self.weight_decay, **g} for g in param_groups]
        if self.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """Multiplier of the base LR after `step` optimizer steps."""
        total = self.epochs * steps_per_epoch
        warmup = round(self.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        if self.lr_schedule == "cosine":
            decay_steps = max(1, total - warmup - self.final_hold_epochs * steps_per_epoch)
            progress = min(1.0, (step - warmup) / decay_steps)
            floor = self.min_lr / self.lr
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "step":
            return self.lr_decay ** sum(step >= m * steps_per_epoch for m in self.milestones)
        return 1.0

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, steps_per_epoch))


@runtime_checkable
class Batches(Protocol):
    """A task's training batches, as the harness uses them (`qatbench.batches` has implementations: device-resident
    tensors, a DataLoader over a seeded sampler). Optional: `set_epoch(e)`, called before each epoch, and
    `waited_s`, the seconds spent waiting for loader workers."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of (inputs, targets), continuing the epoch after `load_state_dict`."""

    def __len__(self) -> int:
        """Batches in an epoch."""

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch stands (tensors and plain values only: it goes into checkpoints)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue that epoch at the next `iter()`."""

    def shard(self, rank: int, world: int) -> None:
        """Yield rank `rank`'s part of each global batch from now on."""


@runtime_checkable
class TestBatches(Protocol):
    """A task's evaluation batches: the whole test split each `iter()`, this rank's part after `shard`."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def shard(self, rank: int, world: int) -> None: ...


BATCHES_NEED = ("__iter__", "__len__", "state_dict", "load_state_dict", "shard")  # what `Batches` declares
TEST_BATCHES_NEED = ("__iter__", "shard")


@dataclasses.dataclass
class TaskData:
    """Training batches, evaluation batches and the split sizes (recorded with every run)."""

    train: Batches
    test: TestBatches
    num_train: int
    num_test: int


def check_batches(task: str, data: Any) -> None:
    """The data a task loaded follows the contract, or a one-line error saying what is missing and what to use."""
    if not isinstance(data, TaskData):
        raise QatbenchError(f"task {task!r}: load_data returned {type(data).__name__}, not a TaskData")
    for split, needed in (("train", BATCHES_NEED), ("test", TEST_BATCHES_NEED)):
        batches = getattr(data, split)
        missing = [name for name in needed if not callable(getattr(batches, name, None))]
        if missing:
            raise QatbenchError(f"task {task!r}: its {split} batches ({type(batches).__name__}) lack "
                                f"{', '.join(sorted(missing))}; wrap them in qatbench.batches.TensorBatches (data on "
                                "the device) or DeviceLoader (a DataLoader over an EpochBatchSampler)")


def published(task: str) -> list[dict[str, Any]]:
    """The papers' numbers for `task` from `tasks/references.yaml`, one entry per paper: {"source", "fp", "rows":
    {method: {column: text}}} (a column is a bit width, or "W/A" such as "2/2"); [] when none are known."""
    text = importlib.resources.files("qatbench.tasks").joinpath("references.yaml").read_text(encoding="utf-8")
    entry = yaml.safe_load(text).get(task, [])
    return [entry] if isinstance(entry, dict) else list(entry)


def hyperparameters(task: str) -> dict[str, Any]:
    """Where `task`'s hyper-parameters come from, from `tasks/hyperparameters.yaml`: {"recipe": {"source", "note"},
    "methods": {method: {"source", "note"}}}; {} when the task has no entry."""
    text = importlib.resources.files("qatbench.tasks").joinpath("hyperparameters.yaml").read_text(encoding="utf-8")
    entry = yaml.safe_load(text).get(task) or {}
    return entry if isinstance(entry, dict) else {}


class Task(ABC):
    """One benchmark task. Subclasses set the class attributes and implement the factories."""

    name: ClassVar[str] = ""  # set by the registry
    Config: ClassVar[type] = NoConfig
    metric: ClassVar[str] = "top1"
    higher_is_better: ClassVar[bool] = True
    recipes: ClassVar[dict[str, Recipe]] = {}
    default_granularity: ClassVar[str] = "channel"
    default_scheme: ClassVar[str] = "uniform"
    # every layer whose input is quantized is followed by a normalization (BatchNorm) that absorbs a constant scale
    # of its output, so an activation quantizer may leave its output unscaled (TALR's modified LSQ)
    normalized_layers: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.act_bits: int | None = None  # the run's activation bit width (None: weights only), set as it resolves

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (the harness seeds the RNG first)."""

    @abstractmethod
    def locate_data(self, data_root: Path | None, download: bool) -> DataSource:
        """Where the data lies and which files will be read (cheap: no file is read, except that a
        missing data set may be downloaded). A given `data_root` is the only place looked."""

    @abstractmethod
    def load_data(self, source: DataSource, device: torch.device, batch_size: int,
                  generator: torch.Generator) -> TaskData:
        """The train and test splits of `source`, checked and ready to iterate on `device`."""

    @abstractmethod
    def is_quantized(self, name: str, parameter: nn.Parameter) -> bool:
        """Whether the parameter `name` is trained with QAT."""

    sample_options: ClassVar[dict[str, Any]] = {}
    """Task options that make the model small enough to train on `write_sample`'s data in seconds."""

    @classmethod
    def write_sample(cls, folder: Path) -> Path:
        """Write a small data set in this task's real on-disk format into `folder` (for tests, and to try the task
        without its data: `qatbench sample`); the path to pass as `--data-root`."""
        raise QatbenchError(f"task {cls.name!r} has no sample data set")

    @classmethod
    def check_plugin(cls) -> None:
        """What `TASKS.register` checks of a task class: it is a Task with every factory implemented, a smoke
        recipe, valid defaults and a dataclass of options."""
        problems = []
        if not isinstance(cls, type) or not issubclass(cls, Task):
            raise QatbenchError(f"{cls!r} is not a qatbench.task.Task")
        if inspect.isabstract(cls):
            problems.append(f"implement {', '.join(sorted(cls.__abstractmethods__))}")
        if "smoke" not in cls.recipes:
            problems.append("give it a 'smoke' recipe (seconds, for tests)")
        if cls.default_scheme not in ("uniform", "lsbq") or cls.default_granularity not in ("channel", "tensor"):
            problems.append("default_scheme must be uniform|lsbq and default_granularity channel|tensor")
        if not dataclasses.is_dataclass(cls.Config):
            problems.append("its Config must be a dataclass")
        if problems:
            raise QatbenchError(f"task class {cls.__qualname__}: " + "; ".join(problems))

    def activation_inputs(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        """The layers whose input is quantized when the run quantizes activations, each with whether that input
        can be negative (signed) or not (after a ReLU); the task's docstring says which and why."""
        raise QatbenchError(f"task {self.name!r} does not quantize activations (--act-bits): it names no layers "
                            "whose input to quantize")

    def shard_units(self, model: nn.Module) -> list[nn.Module] | None:
        """The modules that FSDP2 shards one by one under `--fsdp` (their parameters all-gathered together for
        their forward and backward; the model itself holds the rest); None: the task is not sharded."""
        return None

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(output, target)

    def tokens_per_sample(self) -> int | None:
        """Tokens in one training sample, for language models' tokens/s; None for other tasks."""
        return None

    def no_weight_decay(self, name: str, parameter: nn.Parameter) -> bool:
        """Full-precision parameters trained without weight decay: biases and norms by default."""
        return parameter.dim() < 2

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Quantized parameters in a group marked `"quant": True`; the others with or without weight decay."""
        quantized, decay, no_decay = [], [], []
        for name, parameter in model.named_parameters():
            if self.is_quantized(name, parameter):
                quantized.append(parameter)
            elif self.no_weight_decay(name, parameter):
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        groups = [{"params": quantized, "quant": True}, {"params": decay, "quant": False},
                  {"params": no_decay, "quant": False, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
        """Top-1 accuracy in percent over the whole test split (in a multi-process run, each rank counts its
        shard and the counts are summed over the ranks)."""
        was_training = model.training
        model.eval()
        counts = None  # (correct, seen), on the batches' device
        for inputs, targets in batches:
            batch = torch.stack([(model(inputs).argmax(dim=1) == targets).sum(), targets.new_tensor(len(targets))])
            counts = batch if counts is None else counts + batch
        model.train(was_training)
        correct, total = reduce_tensor_(counts.double()).tolist()
        return 100.0 * correct / total
