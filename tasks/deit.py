"""ImageNet with timm's DeiT-Tiny / DeiT-Small and timm's DeiT data pipeline.

timm is an optional extra (`pip install 'qatbench[vision]'`); without it these tasks
say so in one line when they are run, and `qatbench list` still shows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from qatbench.errors import QatbenchError
from qatbench.params import param
from qatbench.registry import TASKS
from qatbench.task import Recipe, TaskData
from qatbench.tasks.imagenet import ImageFolderConfig, ImageFolderTask, folder_loaders, image_folders

NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "dist_token")


def _timm(task: str) -> Any:
    try:
        import timm
        import timm.data
        import timm.loss
    except ImportError:
        raise QatbenchError(f"task {task!r} needs timm: pip install 'qatbench[vision]'") from None
    return timm


@dataclasses.dataclass(frozen=True)
class DeiTConfig(ImageFolderConfig):
    mixup: float = param(0.8, "mixup alpha (0 disables)", ge=0)
    cutmix: float = param(1.0, "CutMix alpha (0 disables)", ge=0)
    label_smoothing: float = param(0.1, "label smoothing", ge=0, lt=1)
    randaugment: str = param("rand-m9-mstd0.5-inc1", "timm auto-augment policy")
    random_erase: float = param(0.25, "random-erasing probability", ge=0, le=1)
    drop_path: float = param(0.1, "stochastic depth rate", ge=0, lt=1)


class DeiTTask(ImageFolderTask):
    """timm DeiT on ImageNet (ImageFolder `train/` and `val/`), DeiT's training recipe.

    Quantized per channel: the linear weights of every attention (qkv, proj) and MLP
    (fc1, fc2) block; the patch embedding, norms, class token, position embedding and
    head stay full precision. Data: timm's `create_transform` (RandomResizedCrop,
    RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic) and timm's `Mixup`
    (mixup 0.8, CutMix 1.0, label smoothing 0.1) applied to each batch on the device,
    with soft-target cross-entropy; evaluation on the center crop (crop 0.875) with hard
    labels. Recipe `paper`: AdamW 5e-4, wd 0.05 (none on norms, biases and tokens),
    batch 512, 300 epochs, 5 warm-up epochs, cosine to 1e-8 reached 20 epochs before the
    end and held there (PARQ's DeiT setting); `short` 30 epochs; `smoke` 10 steps at batch 8.
    """

    Config = DeiTConfig
    arch: ClassVar[str] = "deit_tiny_patch16_224"
    default_granularity = "channel"
    recipes = {
        "smoke": Recipe(epochs=1, batch_size=8, lr=5e-4, optimizer="adamw", weight_decay=0.05, lr_schedule="constant",
                        epoch_steps=10),
        "short": Recipe(epochs=30, batch_size=512, lr=5e-4, optimizer="adamw", weight_decay=0.05, warmup_epochs=2,
                        min_lr=1e-8, final_hold_epochs=2),
        "paper": Recipe(epochs=300, batch_size=512, lr=5e-4, optimizer="adamw", weight_decay=0.05, warmup_epochs=5,
                        min_lr=1e-8, final_hold_epochs=20),
    }

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__(config)
        _timm(self.name)  # a missing extra is said before any data is looked for

    def build_model(self) -> nn.Module:
        timm = _timm(self.name)
        return timm.create_model(self.arch, pretrained=False, num_classes=self.config.num_classes,
                                 img_size=self.config.image_size, drop_path_rate=self.config.drop_path)

    def is_quantized(self, name: str, parameter: nn.Parameter) -> bool:
        return name.startswith("blocks.") and name.endswith(".weight") and parameter.dim() == 2

    def no_weight_decay(self, name: str, parameter: nn.Parameter) -> bool:
        return parameter.dim() < 2 or name in NO_WEIGHT_DECAY

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 2:  # soft targets from mixup / CutMix
            return (-target * output.log_softmax(dim=-1)).sum(dim=-1).mean()
        return nn.functional.cross_entropy(output, target, label_smoothing=self.config.label_smoothing)

    def load_data(self, source, device, batch_size, generator) -> TaskData:
        timm = _timm(self.name)
        config = self.config
        train_transform = timm.data.create_transform(
            config.image_size, is_training=True, auto_augment=config.randaugment or None, interpolation="bicubic",
            re_prob=config.random_erase, re_mode="pixel", re_count=1)
        eval_transform = timm.data.create_transform(config.image_size, is_training=False, interpolation="bicubic",
                                                    crop_pct=0.875)
        train, val = image_folders(self, source, train_transform, eval_transform)
        mix = None
        if config.mixup > 0 or config.cutmix > 0:
            if batch_size % 2:
                raise QatbenchError(f"mixup/CutMix need an even batch size, got {batch_size}")
            mix = timm.data.Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                                  label_smoothing=config.label_smoothing, num_classes=config.num_classes)
        return folder_loaders(self, train, val, device, batch_size, generator, mix)


@TASKS.register("imagenet-deit-tiny")
class ImageNetDeiTTiny(DeiTTask):
    __doc__ = "DeiT-Tiny (5.7M parameters). " + DeiTTask.__doc__
    arch = "deit_tiny_patch16_224"


@TASKS.register("imagenet-deit-small")
class ImageNetDeiTSmall(DeiTTask):
    __doc__ = "DeiT-Small (22M parameters). " + DeiTTask.__doc__
    arch = "deit_small_patch16_224"
