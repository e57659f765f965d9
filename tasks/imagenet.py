"""ImageNet (ImageFolder layout) with torchvision's ResNet-18 and ResNet-50."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from qatbench.data import locate
from qatbench.errors import QatbenchError
from qatbench.params import param
from qatbench.registry import TASKS
from qatbench.task import BatchTransform, DeviceLoader, Recipe, Task, TaskData

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the conventional ImageNet normalization constants
IMAGENET_STD = (0.229, 0.224, 0.225)
HOW_TO_GET_IMAGENET = (
    "Download ILSVRC-2012 from image-net.org and arrange it as FOLDER/train/<class>/*.JPEG and "
    "FOLDER/val/<class>/*.JPEG (the validation images moved into class folders), then pass --data-root FOLDER."
)


@dataclasses.dataclass(frozen=True)
class ImageFolderConfig:
    image_size: int = param(224, "training crop / evaluation crop size in pixels")
    num_classes: int = param(1000, "classes in the data set (ImageNet: 1000; checked against the folders)")
    workers: int = param(8, "DataLoader worker processes")

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.num_classes < 2 or self.workers < 0:
            raise ValueError(f"image_size={self.image_size} must be >= 16, num_classes={self.num_classes} >= 2, "
                             f"workers={self.workers} >= 0")


def image_folders(task: Task, data_root: Path | None, train_transform, eval_transform):
    """The `train/` and `val/` ImageFolders of the first root that has both."""
    from torchvision.datasets import ImageFolder

    folder = locate("ImageNet", ["train", "val"], ("imagenet", "ILSVRC2012", "imagenet/ILSVRC2012"), data_root,
                    HOW_TO_GET_IMAGENET)
    train, val = ImageFolder(str(folder / "train"), train_transform), ImageFolder(str(folder / "val"), eval_transform)
    for split in (train, val):
        if len(split.classes) != task.config.num_classes:
            raise QatbenchError(f"{split.root} has {len(split.classes)} class folders but the task expects "
                                f"num_classes={task.config.num_classes}; pass --task-arg num_classes={len(split.classes)}")
    return train, val


def folder_loaders(task: Task, train, val, device: torch.device, batch_size: int, generator: torch.Generator,
                   train_batch_transform: BatchTransform | None = None) -> TaskData:
    """Multi-worker DataLoaders over the two splits, shuffled by a CPU generator seeded from the run's."""
    loader_generator = torch.Generator().manual_seed(generator.initial_seed())
    common = {"num_workers": task.config.workers, "pin_memory": device.type == "cuda",
              "persistent_workers": task.config.workers > 0}
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                                               generator=loader_generator, **common)
    val_loader = torch.utils.data.DataLoader(val, batch_size=batch_size, shuffle=False, **common)
    return TaskData(train=DeviceLoader(train_loader, device, train_batch_transform),
                    test=DeviceLoader(val_loader, device), num_train=len(train), num_test=len(val))


class ImageNetResNet(Task):
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

    def load_data(self, data_root, device, batch_size, generator, download) -> TaskData:
        from torchvision import transforms as T

        size = self.config.image_size
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        eval_transform = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), normalize])
        train, val = image_folders(self, data_root, train_transform, eval_transform)
        return folder_loaders(self, train, val, device, batch_size, generator)


@TASKS.register("imagenet-resnet18")
class ImageNetResNet18(ImageNetResNet):
    __doc__ = "ResNet-18 (11.7M parameters). " + ImageNetResNet.__doc__
    arch = "resnet18"


@TASKS.register("imagenet-resnet50")
class ImageNetResNet50(ImageNetResNet):
    __doc__ = "ResNet-50 (25.6M parameters). " + ImageNetResNet.__doc__
    arch = "resnet50"
