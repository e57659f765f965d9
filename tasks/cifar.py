"""CIFAR-10 and CIFAR-100 with the CIFAR ResNets of He et al. (2016): ResNet-20 and ResNet-56."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatbench.data import DataSource, check_labels, locate
from qatbench.errors import QatbenchError
from qatbench.params import NoConfig
from qatbench.registry import TASKS
from qatbench.batches import TensorBatches
from qatbench.task import Recipe, Task, TaskData

@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR data set's python version keeps its batches, and what they hold."""

    name: str
    folder: str  # the archive's folder
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test)


CIFAR10 = CifarLayout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), b"labels", 10)
CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python", ("train",), ("test",), b"fine_labels", 100)

# What pickled numpy arrays refer to (CIFAR's own files: Python 2 cPickle of numpy 1.x arrays;
# files rewritten by numpy 2 with protocols 2 to 5); nothing else may be constructed.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, bytes, str, numbers and numpy arrays: a crafted batch
    file that names any other callable is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; option-A shortcut: identity, or stride-2 subsampling with zero-padded channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.extra_channels = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.downsample:
            half = self.extra_channels // 2
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n blocks, 16/32/64 channels, global pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Per-image random crop of a zero-padded batch and random horizontal flip, on the batch's device.

    `images` is `(B, C, H, W)`; every image gets its own offsets in `[0, 2 * padding]` and its
    own coin for the flip, all drawn from `generator`.
    """
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=generator.device).to(device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=generator.device).to(device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]  # (B, 1, W)
    crops = padded.permute(0, 2, 3, 1)[torch.arange(batch, device=device)[:, None, None], rows, cols]
    crops = crops.permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = (torch.rand(batch, generator=generator, device=generator.device) < 0.5).to(device)
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def channel_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and sample standard deviation of uint8 `images` `(N, C, H, W)` on the 0..1 scale,
    `(C, 1, 1)` float32, computed exactly (float64) from each channel's histogram of the 256 pixel
    values, so no float copy of the data set is ever made."""
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt())
    return torch.stack(means).float()[:, None, None], torch.stack(stds).float()[:, None, None]


def read_cifar_batches(folder: Path, names: list[str] | tuple[str, ...],
                       layout: CifarLayout = CIFAR10) -> tuple[Tensor, Tensor]:
    """Images `(N, 3, 32, 32)` uint8 and labels `(N,)` int64 from CIFAR python pickle batches."""
    images, labels = [], []
    for name in names:
        batch_images, batch_labels = _read_batch(folder / name, layout)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


def _read_batch(path: Path, layout: CifarLayout) -> tuple[Tensor, Tensor]:
    """One checked batch: `data` a uint8 array of N x 3072 pixels, its labels N class indices in [0, classes)."""
    what = f"{layout.name} python batch"
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except OSError as err:
        raise QatbenchError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # a garbled pickle raises anything from UnpicklingError to ValueError
        raise QatbenchError(f"{path} is not a {what} ({type(err).__name__}: {err})") from None
    import numpy

    data = batch.get(b"data") if isinstance(batch, dict) else None
    batch_labels = batch.get(layout.label_key) if isinstance(batch, dict) else None
    if not isinstance(data, numpy.ndarray) or data.dtype != numpy.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise QatbenchError(f"{path} is not a {what}: its b'data' is not a uint8 array of N x 3072")
    if not isinstance(batch_labels, list) or not all(type(v) is int for v in batch_labels):
        raise QatbenchError(f"{path} is not a {what}: its {layout.label_key!r} is not a list of integers")
    labels = torch.tensor(batch_labels, dtype=torch.long)
    check_labels(path, labels, len(data), layout.classes)
    return torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), labels


def write_cifar_batches(folder: Path, images: Tensor, labels: Tensor, test_size: int,
                        layout: CifarLayout = CIFAR10) -> Path:
    """Write `images` `(N, 3, 32, 32)` uint8 and `labels` in a CIFAR python layout: CIFAR-10's
    `folder/cifar-10-batches-py/data_batch_1..5` (the first N - test_size, split in five) and `test_batch` (the
    last test_size); CIFAR-100's `folder/cifar-100-python/train` and `test`. The inverse of `read_cifar_batches`."""
    batches = folder / layout.folder
    batches.mkdir(parents=True, exist_ok=True)
    train = len(labels) - test_size
    count = len(layout.train)
    bounds = [round(i * train / count) for i in range(count + 1)]
    parts = [(name, slice(bounds[i], bounds[i + 1])) for i, name in enumerate(layout.train)]
    for name, part in parts + [(layout.test[0], slice(train, None))]:
        record = {b"batch_label": name.encode(), layout.label_key: labels[part].tolist(),
                  b"data": images[part].reshape(-1, 3072).numpy()}
        with open(batches / name, "wb") as f:
            pickle.dump(record, f)
    return folder


class CifarTask(Task):
    """CIFAR (python pickle batches) with a CIFAR ResNet; option-A shortcuts (no parameters).

    Every convolution and the final linear weight are quantized, the first convolution
    included, as in the PARQ reference (every parameter named `weight` except norms),
    per tensor with LSBQ levels by default (the reference's CIFAR script); biases and
    BatchNorm stay full precision, without weight decay. With `--act-bits A` (TALR's setting,
    and PARQ's W/A practice) the first convolution and the last linear stay full precision, and
    the input of every other convolution (after a ReLU: unsigned) is quantized. The whole data set lives on the run's
    device as uint8; each training batch is padded by 4, randomly cropped to 32x32 and
    flipped on the device, then normalized by the training split's per-channel mean
    and standard deviation.

    Recipes: `paper` as the PARQ paper (SGD 0.1, momentum 0.9, wd 2e-4, batch 128,
    200 epochs, LR /10 at epochs 80, 120, 150); `talr` as the TALR paper (SGD 0.1, momentum 0.9,
    wd 1e-4, batch 256, 400 epochs, cosine) and `talr-adam` its Adam rows (AdamW 1e-3); `short` 30
    epochs with cosine decay; `smoke` 20 steps at batch 32.
    """

    Config = NoConfig
    depth: ClassVar[int] = 20
    layout: ClassVar[CifarLayout] = CIFAR10
    normalized_layers = True  # every convolution is followed by BatchNorm
    default_scheme = "lsbq"  # the PARQ paper's CIFAR runs: greedy LSBQ levels, per tensor
    default_granularity = "tensor"
    recipes = {
        "smoke": Recipe(epochs=1, batch_size=32, lr=0.1, weight_decay=2e-4, lr_schedule="constant", epoch_steps=20),
        "short": Recipe(epochs=30, batch_size=128, lr=0.1, weight_decay=2e-4),
        "paper": Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=2e-4, lr_schedule="step",
                        milestones=(80, 120, 150)),
        # TALR (Lee et al., ICCV 2025), its CIFAR setting: SGD lr 0.1, momentum 0.9, wd 1e-4, batch 256, 400 epochs
        # (cosine); its Adam rows: lr 1e-3 (this project's reading; the paper's Adam weight decay is taken as 1e-4)
        "talr": Recipe(epochs=400, batch_size=256, lr=0.1, weight_decay=1e-4),
        "talr-adam": Recipe(epochs=400, batch_size=256, lr=1e-3, weight_decay=1e-4, optimizer="adamw"),
    }

    @classmethod
    def write_sample(cls, folder: Path, per_batch: int = 20, test_size: int = 40, seed: int = 0) -> Path:
        """CIFAR-10's python layout (`cifar-10-batches-py/data_batch_1..5`, `test_batch`) holding a learnable toy
        problem: each class brightens one colour channel of random pixels."""
        n = 5 * per_batch + test_size
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, cls.layout.classes, (n,), generator=generator)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            images[i, label % 3] = images[i, label % 3] // 4 + 190
        return write_cifar_batches(folder, images, labels, test_size, cls.layout)

    def build_model(self) -> nn.Module:
        return CifarResNet(self.depth, self.layout.classes)

    def is_quantized(self, name: str, parameter: nn.Parameter) -> bool:
        if self.act_bits and name in ("conv1.weight", "fc.weight"):  # W/A: first and last layer in full precision
            return False
        return name.endswith("weight") and parameter.dim() > 1

    def activation_inputs(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        return [(m, False) for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.conv1]

    def _download(self, target: Path) -> None:
        import torchvision.datasets

        dataset = torchvision.datasets.CIFAR10 if self.layout is CIFAR10 else torchvision.datasets.CIFAR100
        dataset(root=str(target), train=True, download=True)

    def locate_data(self, data_root, download) -> DataSource:
        layout = self.layout
        folder = locate(layout.name, list(layout.files), (layout.folder, f"{layout.name.lower()}/{layout.folder}"),
                        data_root, f"Put the python version of {layout.name} (folder {layout.folder}) under "
                        "--data-root, or let torchvision download it (needs internet).",
                        self._download if download else None)
        return DataSource(layout.name, folder, tuple(folder / name for name in layout.files))

    def load_data(self, source, device, batch_size, generator) -> TaskData:
        folder = source.root
        train_x, train_y = read_cifar_batches(folder, self.layout.train, self.layout)
        test_x, test_y = read_cifar_batches(folder, self.layout.test, self.layout)
        train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
        mean, std = channel_statistics(train_x)

        def normalize(images: Tensor) -> Tensor:
            return (images.float().div_(255) - mean) / std

        def train_transform(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            return normalize(random_crop_flip(images, generator)), labels

        def test_transform(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            return normalize(images), labels

        return TaskData(
            train=TensorBatches(train_x, train_y, batch_size, shuffle=True, generator=generator, drop_last=True,
                                transform=train_transform),
            test=TensorBatches(test_x, test_y, 1000, shuffle=False, transform=test_transform),
            num_train=len(train_y),
            num_test=len(test_y),
        )


@TASKS.register("cifar10-resnet20")
class Cifar10ResNet20(CifarTask):
    __doc__ = "ResNet-20 (0.27M parameters). " + CifarTask.__doc__
    depth = 20


@TASKS.register("cifar10-resnet56")
class Cifar10ResNet56(CifarTask):
    __doc__ = "ResNet-56 (0.85M parameters). " + CifarTask.__doc__
    depth = 56


@TASKS.register("cifar100-resnet20")
class Cifar100ResNet20(CifarTask):
    __doc__ = ("CIFAR-100 (its 100 fine labels), ResNet-20 (0.28M parameters); TALR's headline task. "
               + CifarTask.__doc__)
    depth = 20
    layout = CIFAR100
