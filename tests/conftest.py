"""Shared fixtures: small data sets written in their real on-disk formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_CODES = {torch.uint8: 0x08, torch.int32: 0x0C, torch.float32: 0x0D}


def write_idx(path: Path, tensor: torch.Tensor, compress: bool) -> Path:
    """Write `tensor` as an IDX file (big-endian header and data), gzipped if `compress`."""
    header = bytes([0, 0, _IDX_CODES[tensor.dtype], tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    data = tensor.contiguous()
    if data.element_size() > 1:
        data = data.view(torch.uint8).view(-1, data.element_size()).flip(1)
    payload = header + bytes(data.numpy().tobytes())
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_dataset(folder: Path, num_train: int = 512, num_test: int = 256, seed: int = 0) -> Path:
    """A learnable 10-class MNIST-format data set: each class lights its own band of rows.

    The training files are gzipped (as Debian ships them), the test files plain.
    """
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, n, compress in (("train", num_train, True), ("t10k", num_test, False)):
        labels = torch.randint(0, 10, (n,), generator=generator)
        images = torch.randint(0, 60, (n, 28, 28), generator=generator)
        for i, label in enumerate(labels.tolist()):
            images[i, 2 * label + 4 : 2 * label + 6, 4:24] += 180
        write_idx(folder / f"{split}-images-idx3-ubyte", images.to(torch.uint8), compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels.to(torch.uint8), compress)
    return folder


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A folder holding a tiny data set in the MNIST IDX format."""
    return make_idx_dataset(tmp_path / "idx")


@pytest.fixture
def isolated_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $QATBENCH_DATA and an empty home cache, so only --data-root and system folders count."""
    monkeypatch.delenv("QATBENCH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
