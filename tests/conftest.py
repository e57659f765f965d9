"""Shared fixtures: small data sets written in their real on-disk formats."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest
import torch

from qatbench.results import load_records

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REAL_DATA = pytest.mark.realdata(pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(),
                                                    reason="Debian's dataset-fashion-mnist is not installed"))
"""End-to-end runs on the real Fashion-MNIST: few, and marked (`pytest -m "not realdata"` leaves them out)."""

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


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, so none depends on test order or luck."""
    torch.manual_seed(0)


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A folder holding a tiny data set in the MNIST IDX format."""
    return make_idx_dataset(tmp_path / "idx")


@pytest.fixture
def isolated_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $QATBENCH_DATA and an empty home cache, so only --data-root and system folders count."""
    monkeypatch.delenv("QATBENCH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def make_cifar_batches(folder: Path, per_batch: int = 20, test_size: int = 40, seed: int = 0) -> Path:
    """CIFAR-10's python layout (cifar-10-batches-py/data_batch_1..5, test_batch) holding a
    learnable toy problem: each class brightens one colour channel."""
    from qatbench.tasks.cifar import write_cifar_batches

    n = 5 * per_batch + test_size
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, label % 3] = images[i, label % 3] // 4 + 190
    return write_cifar_batches(folder, images, labels, test_size)


def make_image_folder(root: Path, classes: int = 3, per_class_train: int = 4, per_class_val: int = 2,
                      size: int = 40, seed: int = 0) -> Path:
    """An ImageNet-style tree of JPEG files: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"img_{i}.JPEG", format="JPEG")
    return root


def write_corpus(path, sentences=1500, seed=0):
    """A generated English-like corpus: a small grammar, so that a model can lower its perplexity."""
    generator = torch.Generator().manual_seed(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my friend", "the old man"], ["sees", "likes", "finds"], \
        ["the ball", "a red house", "the river", "some bread"]

    def pick(words):
        return words[torch.randint(len(words), (1,), generator=generator).item()]

    path.write_text("\n".join(f"{pick(subjects)} {pick(verbs)} {pick(objects)}." for _ in range(sentences)))
    return path


def load_task_data(task, root: Path | None, batch_size: int, seed: int = 0):
    """The task's data from `root` (nothing downloaded), as a run on the CPU loads it."""
    return task.load_data(task.locate_data(root, download=False), torch.device("cpu"), batch_size,
                          torch.Generator().manual_seed(seed))


def smoke_run(tmp_path: Path, *argv: str) -> dict:
    """`qatbench run ARGV --recipe smoke --no-download --out TMP`: one finished record, exactly quantized unless fp."""
    from qatbench.cli import main

    out = tmp_path / "runs"
    assert main(["run", *argv, "--recipe", "smoke", "--no-download", "--out", str(out)]) == 0
    [path] = out.rglob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "ok"
    assert record["exactness"]["passed"] is (None if record["bits"] is None else True)  # fp has nothing to check
    return record


def exports(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """method -> its exported tensors, for every record under `out`."""
    from safetensors import safe_open

    tensors = {}
    for record in load_records([out]):
        with safe_open(str(out / record.task / record.export["file"]), "pt") as f:
            tensors[record.method] = {k: f.get_tensor(k) for k in f.keys()}
    return tensors


EXECUTION_KEYS = ("processes", "micro_batch", "fsdp")
"""Identity options that say how a run is executed: they change only the order of float sums, but a run's
identity holds them, as it holds everything that changes its numbers."""


def assert_same_experiments(one: list, two: list) -> None:
    """The records `one` and `two` are of the same experiments: identities equal but for how they were
    executed (`EXECUTION_KEYS`), which makes their run ids differ."""
    def experiment(record) -> str:
        return json.dumps({k: v for k, v in record.spec.items() if k not in EXECUTION_KEYS}, sort_keys=True)

    assert sorted(map(experiment, one)) == sorted(map(experiment, two)) and len(one) == len(two)


def assert_same_training(reference: Path, other: Path) -> list:
    """The runs under `other` are those under `reference` (the same experiments, executed otherwise) and trained
    to the same result: equal metrics, losses within 1e-5, the same level of every quantized weight, other
    weights within 1e-5. Returns the records of `other`."""
    one, two = load_records([reference]), load_records([other])
    assert_same_experiments(one, two)
    for a, b in zip(sorted(one, key=lambda r: r.method), sorted(two, key=lambda r: r.method)):
        assert a.metric == b.metric and a.history[-1][a.metric_name] == b.history[-1][b.metric_name], a.method
        assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], abs=1e-5)
    exports_one, exports_two = exports(reference), exports(other)
    for method, tensors in exports_one.items():
        for name, tensor in tensors.items():
            if name.endswith(".indices"):  # training ended on the same level of every weight
                assert torch.equal(tensor, exports_two[method][name]), (method, name)
            else:
                torch.testing.assert_close(tensor, exports_two[method][name], rtol=0, atol=1e-5)
    return two
