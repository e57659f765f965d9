"""Shared fixtures: small data sets written in their real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qatbench.results import load_records

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REAL_DATA = pytest.mark.realdata(pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(),
                                                    reason="Debian's dataset-fashion-mnist is not installed"))
"""End-to-end runs on the real Fashion-MNIST: few, and marked (`pytest -m "not realdata"` leaves them out)."""

def make_idx_dataset(folder: Path, num_train: int = 512, num_test: int = 256, seed: int = 0) -> Path:
    """A learnable 10-class MNIST-format data set (the task's own sample writer)."""
    from qatbench.tasks.mnist import MLPTask

    return MLPTask.write_sample(folder, num_train, num_test, seed)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, so none depends on test order or luck."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registries_restored():
    """A plugin a test registers is gone after it: every test sees the built-in methods and tasks only."""
    from qatbench.registry import METHODS, TASKS

    for registry in (METHODS, TASKS):
        registry.names()  # the built-in plugins discovered before the snapshot
    saved = {registry: dict(registry._entries) for registry in (METHODS, TASKS)}
    yield
    for registry, entries in saved.items():
        registry._entries.clear()
        registry._entries.update(entries)


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
    """CIFAR-10's python layout holding a learnable toy problem (the task's own sample writer)."""
    from qatbench.tasks.cifar import CifarTask

    return CifarTask.write_sample(folder, per_batch, test_size, seed)


def make_image_folder(root: Path, classes: int = 3, per_class_train: int = 4, per_class_val: int = 2,
                      size: int = 40, seed: int = 0) -> Path:
    """An ImageNet-style tree of JPEG files (the task's own sample writer)."""
    from qatbench.tasks.imagenet import ImageFolderTask

    return ImageFolderTask.write_sample(root, classes, per_class_train, per_class_val, size, seed)


def write_corpus(path: Path, sentences: int = 1500, seed: int = 0) -> Path:
    """A generated English-like corpus at `path` (the language-model tasks' own sample writer)."""
    from qatbench.tasks.llama import LlamaTask

    corpus = LlamaTask.write_sample(path.parent / f".{path.name}.sample", sentences, seed)
    corpus.replace(path)
    corpus.parent.rmdir()
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
