"""ImageNet (ImageFolder layout) with torchvision's ResNet-18 and ResNet-50."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from qatbench.data import DataSource, locate
from qatbench.errors import QatbenchError
from qatbench.params import param
from qatbench.registry import TASKS
from qatbench.batches import BatchTransform, DeviceLoader, EpochBatchSampler, SeededSamples
from qatbench.task import Recipe, Task, TaskData

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the conventional ImageNet normalization constants
IMAGENET_STD = (0.229, 0.224, 0.225)
HOW_TO_GET_IMAGENET = (
    "Download ILSVRC-2012 from image-net.org and arrange it as FOLDER/train/<class>/*.JPEG and "
    "FOLDER/val/<class>/*.JPEG (the validation images moved into class folders), then pass --data-root FOLDER."
)


@dataclasses.dataclass(frozen=True)
class ImageFolderConfig:
    image_size: int = param(224, "training crop / evaluation crop size in pixels", ge=16)
    num_classes: int = param(1000, "classes in the data set (ImageNet: 1000; checked against the folders)", ge=2)
    workers: int | None = param(None, "DataLoader worker processes (none: this process's share of the CPU cores "
                                      "it may use, the cores divided among the local ranks)", ge=0)


def default_workers() -> int:
    """The loader workers of one process when none are asked for: the CPU cores this process may run on (its
    affinity, which SLURM, containers and `qatbench sweep --executor local` restrict), divided among the ranks
    that torchrun started on this machine (LOCAL_WORLD_SIZE; under SLURM each task has its own cores already),
    at least 1. Decoding and augmenting JPEGs is the usual bottleneck of ImageNet training, so every available
    core decodes; each worker's batches pass through shared memory (/dev/shm)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    sharing = int(local) if local.isdigit() and int(local) > 0 and "SLURM_STEP_ID" not in os.environ else 1
    return max(1, cores // sharing)


def locate_image_folders(data_root: Path | None) -> DataSource:
    """The first root holding `train/` and `val/`, with every file below them (names and sizes fingerprint
    ImageNet; small folders are fingerprinted by content)."""
    from qatbench.fingerprint import files_under

    folder = locate("ImageNet", ["train", "val"], ("imagenet", "ILSVRC2012", "imagenet/ILSVRC2012"), data_root,
                    HOW_TO_GET_IMAGENET)
    return DataSource("ImageNet", folder, tuple(files_under(folder / "train") + files_under(folder / "val")))


def image_folders(task: Task, source: DataSource, train_transform, eval_transform):
    """The `train/` and `val/` ImageFolders of `source`, with as many class folders as the task expects."""
    from torchvision.datasets import ImageFolder

    folder = source.root
    try:
        train = ImageFolder(str(folder / "train"), train_transform)
        val = ImageFolder(str(folder / "val"), eval_transform)
    except (FileNotFoundError, OSError) as err:
        raise QatbenchError(f"{folder}: not an ImageFolder tree ({err})") from None
    if train.classes != val.classes:
        raise QatbenchError(f"{folder}: train/ and val/ have different class folders")
    for split in (train, val):
        if len(split.classes) != task.config.num_classes:
            raise QatbenchError(f"{split.root} has {len(split.classes)} class folders but the task expects "
                                f"num_classes={task.config.num_classes}; pass --task-arg num_classes={len(split.classes)}")
    return train, val


def folder_loaders(task: Task, train, val, device: torch.device, batch_size: int, generator: torch.Generator,
                   train_batch_transform: BatchTransform | None = None) -> TaskData:
    """Multi-worker DataLoaders over the two splits. The order of epoch e and each sample's augmentation are
    functions of (the run's seed, e, the sample), so a resumed run loads exactly the batches it would have
    (`EpochBatchSampler`, `SeededSamples`); the loaders' own generator keeps them off the global RNG."""
    seed = generator.initial_seed()
    workers = default_workers() if task.config.workers is None else task.config.workers

    def loader(split, shuffle: bool, drop_last: bool) -> torch.utils.data.DataLoader:
        sampler = EpochBatchSampler(len(split), batch_size, seed, shuffle, drop_last)
        return torch.utils.data.DataLoader(
            SeededSamples(split), batch_sampler=sampler, generator=torch.Generator().manual_seed(seed),
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    train_loader, val_loader = loader(train, True, True), loader(val, False, False)
    return TaskData(train=DeviceLoader(train_loader, device, train_batch_transform),
                    test=DeviceLoader(val_loader, device), num_train=len(train), num_test=len(val))


class ImageFolderTask(Task):
    """A task on ImageFolder data (`train/<class>/*`, `val/<class>/*`)."""

    sample_options = {"num_classes": 3, "image_size": 32, "workers": 0}

    def locate_data(self, data_root, download) -> DataSource:
        return locate_image_folders(data_root)

    @classmethod
    def write_sample(cls, folder: Path, classes: int = 3, per_class_train: int = 4, per_class_val: int = 2,
                     size: int = 40, seed: int = 0) -> Path:
        """An ImageNet-style tree of JPEG files of random pixels: `folder/train/<wnid>/*.JPEG`, `folder/val/...`."""
        from PIL import Image

        generator = torch.Generator().manual_seed(seed)
        for split, count in (("train", per_class_train), ("val", per_class_val)):
            for c in range(classes):
                class_folder = folder / split / f"n{c:08d}"
                class_folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
                    Image.fromarray(pixels.numpy()).save(class_folder / f"img_{i}.JPEG", format="JPEG")
        return folder


class ImageNetResNet(ImageFolderTask):
    """torchvision ResNet on ImageNet (ImageFolder `train/` and `val/`), per-channel quantization.

    Every convolution and the final linear weight are quantized (the first convolution
    included, as in the PARQ reference); biases and BatchNorm stay full precision.
    Training: RandomResizedCrop + horizontal flip; evaluation: resize to 256/224 of the
    crop, center crop. Recipes: `paper` (SGD 0.1, momentum 0.9, wd 1e-4, batch 256,
    90 epochs, LR /10 every 30); `short` 16 epochs, cosine; `smoke` 10 steps at batch 8.
    The PARQ paper fine-tunes from a full-precision model: pass `--init` the checkpoint
    that a `--method fp` run of this task wrote.
    """

    Config = ImageFolderConfig
    arch: ClassVar[str] = "resnet18"
    recipes = {
        "smoke": Recipe(epochs=1, batch_size=8, lr=0.1, weight_decay=1e-4, lr_schedule="constant", epoch_steps=10),
        "short": Recipe(epochs=16, batch_size=256, lr=0.1, weight_decay=1e-4),
        "paper": Recipe(epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4, lr_schedule="step",
                        milestones=(30, 60)),
    }

    def build_model(self) -> nn.Module:
        import torchvision.models

        return getattr(torchvision.models, self.arch)(weights=None, num_classes=self.config.num_classes)

    def is_quantized(self, name: str, parameter: nn.Parameter) -> bool:
        return name.endswith("weight") and parameter.dim() > 1

    def load_data(self, source, device, batch_size, generator) -> TaskData:
        from torchvision import transforms as T

        size = self.config.image_size
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        eval_transform = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), normalize])
        train, val = image_folders(self, source, train_transform, eval_transform)
        return folder_loaders(self, train, val, device, batch_size, generator)


@TASKS.register("imagenet-resnet18")
class ImageNetResNet18(ImageNetResNet):
    __doc__ = "ResNet-18 (11.7M parameters). " + ImageNetResNet.__doc__
    arch = "resnet18"


@TASKS.register("imagenet-resnet50")
class ImageNetResNet50(ImageNetResNet):
    __doc__ = "ResNet-50 (25.6M parameters). " + ImageNetResNet.__doc__
    arch = "resnet50"
