import json
import pickle

import numpy as np
import pytest
import torch

from qatbench.cli import main
from qatbench.errors import QatbenchError
from qatbench.registry import TASKS
from qatbench.params import NoConfig
from qatbench.tasks.cifar import channel_statistics, random_crop_flip, read_cifar_batches
from tests.conftest import make_cifar_batches, smoke_run


@pytest.fixture
def cifar_root(tmp_path):
    return make_cifar_batches(tmp_path / "cifar")


@pytest.mark.parametrize("name, params", [("cifar10-resnet20", 269_722), ("cifar10-resnet56", 853_018)])
def test_parameter_counts(name, params):
    model = TASKS.get(name)(NoConfig()).build_model()
    assert sum(p.numel() for p in model.parameters()) == params  # 0.27M / 0.85M, option-A shortcuts


def test_every_conv_and_the_linear_weight_are_quantized_but_not_bn_or_bias():
    task = TASKS.get("cifar10-resnet20")(NoConfig())
    model = task.build_model()
    chosen = [n for n, p in model.named_parameters() if task.is_quantized(n, p)]
    assert chosen[0] == "conv1.weight" and chosen[-1] == "fc.weight"
    assert len(chosen) == 1 + 18 + 1  # first conv, 9 blocks x 2 convs, the classifier
    assert not any("bn" in n or n.endswith("bias") for n in chosen)


def test_reader_takes_the_python_pickle_batches(cifar_root):
    images, labels = read_cifar_batches(cifar_root / "cifar-10-batches-py", ["data_batch_1", "data_batch_2"])
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (40,)


def test_a_file_that_is_not_a_batch_is_a_clear_error(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(QatbenchError, match="not a CIFAR-10 python batch"):
        read_cifar_batches(tmp_path, ["data_batch_1"])


class _RunsCode:
    """What a crafted pickle would do: call os.system when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_batch_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    batch = {b"data": _RunsCode(marker), b"labels": [0]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(QatbenchError, match=r"data_batch_1 is not a CIFAR-10 python batch.*refusing to load posix.system"):
        read_cifar_batches(tmp_path, ["data_batch_1"])
    assert not marker.exists()


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 10]}, r"labels range over \[0, 10\]"),
    ({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0]}, r"1,\) labels for 2 examples"),
    ({b"data": np.zeros((2, 3072), dtype=np.float32), b"labels": [0, 1]}, "not a uint8 array"),
    ({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": ["0", "1"]}, "not a list of integers"),
    ([1, 2, 3], "not a uint8 array"),
])
def test_a_batch_with_wrong_contents_is_an_error_naming_the_file(tmp_path, batch, message):
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(QatbenchError, match=message) as err:
        read_cifar_batches(tmp_path, ["test_batch"])
    assert str(tmp_path / "test_batch") in str(err.value)


def test_batches_pickled_with_every_protocol_load(tmp_path):
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": images, b"labels": [3, 4]}, protocol=protocol))
        loaded, labels = read_cifar_batches(tmp_path, ["data_batch_1"])
        assert loaded.flatten().tolist() == images.flatten().tolist() and labels.tolist() == [3, 4]


def test_channel_statistics_match_a_float_copy():
    images = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_statistics(images)
    pixels = images.double() / 255
    torch.testing.assert_close(mean, pixels.mean(dim=(0, 2, 3)).float()[:, None, None])
    torch.testing.assert_close(std, pixels.std(dim=(0, 2, 3)).float()[:, None, None])


def test_crop_and_flip_shapes_happen_and_are_deterministic():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32).repeat(50, 1, 1, 1)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    again = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    unchanged = sum(torch.equal(o, i) for o, i in zip(out, images))
    assert unchanged < 10  # most images moved or flipped
    # each output is a (possibly flipped) 32x32 window of the zero-padded input
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for o, p in zip(out[:8], padded[:8]):
        windows = [p[:, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(2)) for w in windows)
    flipped = [any(torch.equal(o, p[:, y:y + 32, x:x + 32].flip(2)) for y in range(9) for x in range(9))
               and not any(torch.equal(o, p[:, y:y + 32, x:x + 32]) for y in range(9) for x in range(9))
               for o, p in zip(out, padded)]
    assert 20 < sum(flipped) < 80


@pytest.mark.parametrize("task", ["cifar10-resnet20", "cifar10-resnet56"])
def test_smoke_run_through_the_cli(task, cifar_root, isolated_data_env, tmp_path):
    record = smoke_run(tmp_path, "--method", "parq", "--task", task, "--bits", "2", "--batch-size", "16",
                       "--data-root", str(cifar_root))
    assert (record["num_train"], record["num_test"]) == (100, 40)
    assert record["spec"]["quantizer"]["scheme"] == "lsbq" and record["exactness"]["granularity"] == "tensor"


def test_fp_checkpoint_starts_a_qat_run(cifar_root, isolated_data_env, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["--task", "cifar10-resnet20", "--recipe", "smoke", "--batch-size", "16", "--data-root", str(cifar_root),
            "--no-download", "--out", str(out)]
    assert main(["run", "--method", "fp", *base]) == 0
    [checkpoint] = out.rglob("fp-*.safetensors")
    assert main(["run", "--method", "ste", "--bits", "2", "--init", str(checkpoint), *base]) == 0
    [ste] = [json.loads(p.read_text()) for p in out.rglob("ste-*.json")]
    assert ste["status"] == "ok" and ste["spec"]["init"]["file"] == checkpoint.name
    capsys.readouterr()
    assert main(["run", "--method", "ste", "--bits", "2", "--init", str(tmp_path / "none.pt"), *base]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


def test_channels_last_run_quantizes_the_nhwc_weights_exactly(cifar_root, isolated_data_env, tmp_path):
    record = smoke_run(tmp_path, "--method", "ste", "--task", "cifar10-resnet20", "--bits", "2", "--batch-size", "16",
                       "--granularity", "channel", "--channels-last", "--data-root", str(cifar_root))
    assert record["spec"]["channels_last"] is True
