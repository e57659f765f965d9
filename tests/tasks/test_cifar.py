import json

import pytest
import torch

from qatbench.cli import main
from qatbench.errors import QatbenchError
from qatbench.registry import TASKS
from qatbench.params import NoConfig
from qatbench.tasks.cifar import random_crop_flip, read_cifar_batches
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
    [checkpoint] = out.rglob("fp-*.pt")
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
