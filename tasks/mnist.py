"""MNIST and Fashion-MNIST with the 2-layer MLP of the FOGZO paper (784-10-10, 7,960 parameters)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from qatbench.data import DataSource, check_labels, existing_file, locate, read_idx, write_idx
from qatbench.errors import QatbenchError
from qatbench.params import param
from qatbench.registry import TASKS
from qatbench.batches import TensorBatches
from qatbench.task import Recipe, Task, TaskData

NUM_CLASSES = 10
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    hidden: int = param(10, "width of the hidden layer (FOGZO's MLP: 10)", ge=1)


class MLPTask(Task):
    """`Linear(784, hidden) -> ReLU -> Linear(hidden, 10)` on 28x28 grey images.

    Every linear weight is quantized (first and last layer included, as in FOGZO's
    experiment); biases stay full precision. With `--act-bits A` the input of both layers is
    quantized too: the first layer's (the standardized image) signed, the second's (after the
    ReLU) unsigned. Inputs are standardized with the
    training split's own mean and standard deviation. The whole data set lives on
    the run's device as float32 tensors (60,000 x 784 x 4 bytes = 188 MB).

    Recipes (this project's choice; the FOGZO paper gives no MLP schedule we could
    verify): SGD, momentum 0.9, lr 0.02 (0.1 made 2-bit STE oscillate), batch 128,
    cosine decay; `paper` 20 epochs,
    `short` 5, `smoke` 1.
    """

    Config = MLPConfig
    dataset: ClassVar[str] = ""
    subdirs: ClassVar[tuple[str, ...]] = ()
    torchvision_class: ClassVar[str] = ""
    how_to_get: ClassVar[str] = ""
    recipes = {
        "smoke": Recipe(epochs=1, batch_size=128, lr=0.02, epoch_steps=20),
        "short": Recipe(epochs=5, batch_size=128, lr=0.02),
        "paper": Recipe(epochs=20, batch_size=128, lr=0.02),
    }

    @classmethod
    def write_sample(cls, folder: Path, num_train: int = 512, num_test: int = 256, seed: int = 0) -> Path:
        """A learnable 10-class data set in the four IDX files (training files gzipped, as Debian ships them, test
        files plain): each class lights its own band of rows of random grey noise."""
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        for split, n, compress in (("train", num_train, True), ("t10k", num_test, False)):
            labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
            images = torch.randint(0, 60, (n, 28, 28), generator=generator)
            for i, label in enumerate(labels.tolist()):
                images[i, 2 * label + 4: 2 * label + 6, 4:24] += 180
            write_idx(folder / f"{split}-images-idx3-ubyte", images.to(torch.uint8), compress)
            write_idx(folder / f"{split}-labels-idx1-ubyte", labels.to(torch.uint8), compress)
        return folder

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, self.config.hidden), nn.ReLU(), nn.Linear(self.config.hidden, NUM_CLASSES))

    def is_quantized(self, name: str, parameter: nn.Parameter) -> bool:
        return name.endswith("weight")

    def activation_inputs(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        return [(model[1], True), (model[3], False)]

    def _download(self, target: Path) -> None:
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.torchvision_class)
        for train in (True, False):
            dataset_class(root=str(target), train=train, download=True)

    def locate_data(self, data_root, download) -> DataSource:
        folder = locate(self.dataset, list(IDX_FILES.values()), self.subdirs, data_root, self.how_to_get,
                        self._download if download else None)
        return DataSource(self.dataset, folder, tuple(existing_file(folder / name) for name in IDX_FILES.values()))

    def load_data(self, source, device, batch_size, generator) -> TaskData:
        paths = dict(zip(IDX_FILES, source.files))
        arrays = {key: read_idx(path) for key, path in paths.items()}
        for split in ("train", "test"):
            images = arrays[f"{split}_images"]
            if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
                raise QatbenchError(f"{paths[f'{split}_images']}: images of shape {tuple(images.shape)}, "
                                    "expected (N, 28, 28)")
            check_labels(paths[f"{split}_labels"], arrays[f"{split}_labels"], len(images), NUM_CLASSES)
        train_x = arrays["train_images"].to(device=device, dtype=torch.float32).flatten(1) / 255.0
        test_x = arrays["test_images"].to(device=device, dtype=torch.float32).flatten(1) / 255.0
        mean, std = train_x.mean(), train_x.std()
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        train_y = arrays["train_labels"].to(device=device, dtype=torch.long)
        test_y = arrays["test_labels"].to(device=device, dtype=torch.long)
        return TaskData(
            train=TensorBatches(train_x, train_y, batch_size, shuffle=True, generator=generator, drop_last=True),
            test=TensorBatches(test_x, test_y, 1000, shuffle=False),
            num_train=len(train_y),
            num_test=len(test_y),
        )


@TASKS.register("mnist-mlp")
class MNISTMLP(MLPTask):
    __doc__ = "MNIST digits. " + MLPTask.__doc__
    dataset = "MNIST"
    subdirs = ("mnist", "MNIST/raw")
    torchvision_class = "MNIST"
    how_to_get = ("Put the four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and pass "
                  "--data-root FOLDER, or let torchvision download them (needs internet).")


@TASKS.register("fashion-mnist-mlp")
class FashionMNISTMLP(MLPTask):
    __doc__ = "Fashion-MNIST (Zalando). " + MLPTask.__doc__
    dataset = "Fashion-MNIST"
    subdirs = ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist")
    torchvision_class = "FashionMNIST"
    how_to_get = ("On Debian/Ubuntu: apt-get install dataset-fashion-mnist (offline, into "
                  "/usr/share/datasets/fashion-mnist); or put the four IDX files in a folder and pass "
                  "--data-root FOLDER; or let torchvision download them (needs internet).")
