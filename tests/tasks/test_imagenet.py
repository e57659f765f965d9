import pytest

from qatbench.cli import main
from qatbench.params import build_config
from qatbench.registry import TASKS
from tests.conftest import load_task_data, make_image_folder, smoke_run


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


def _task(name, **options):
    cls = TASKS.get(name)
    return cls(build_config(cls.Config, options, name))


@pytest.mark.parametrize("name, params", [("imagenet-resnet18", 11_689_512), ("imagenet-resnet50", 25_557_032)])
def test_torchvision_models_and_parameter_counts(name, params):
    model = _task(name).build_model()
    assert sum(p.numel() for p in model.parameters()) == params


def test_every_conv_and_the_fc_weight_are_quantized():
    task = _task("imagenet-resnet18")
    chosen = [n for n, p in task.build_model().named_parameters() if task.is_quantized(n, p)]
    assert chosen[0] == "conv1.weight" and chosen[-1] == "fc.weight" and len(chosen) == 21
    assert not any(".bn" in n or "downsample.1" in n for n in chosen)


def test_image_folder_loader_batches(image_root, isolated_data_env):
    import torch

    task = _task("imagenet-resnet18", num_classes=3, image_size=32, workers=0)
    data = load_task_data(task, image_root, 4, 0)
    assert (data.num_train, data.num_test, len(data.train)) == (12, 6, 3)
    images, labels = next(iter(data.train))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long
    assert data.train.waited_s > 0  # decoding the first batch, which the run reports as its data wait


def test_class_count_mismatch_is_a_one_line_error(image_root, isolated_data_env, tmp_path, capsys):
    assert main(["run", "--method", "fp", "--task", "imagenet-resnet18", "--recipe", "smoke", "--data-root",
                 str(image_root), "--task-arg", "workers=0", "--out", str(tmp_path / "o")]) == 2
    assert "has 3 class folders but the task expects num_classes=1000" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["imagenet-resnet18", "imagenet-resnet50"])
def test_smoke_run_through_the_cli(task, image_root, isolated_data_env, tmp_path):
    record = smoke_run(tmp_path, "--method", "ste", "--task", task, "--bits", "4", "--batch-size", "4", "--task-arg",
                       "num_classes=3", "--task-arg", "image_size=32", "--task-arg", "workers=0",
                       "--data-root", str(image_root))
    assert record["exactness"]["granularity"] == "channel"


def test_loader_workers_default_to_this_ranks_share_of_the_cores(monkeypatch):
    from qatbench.tasks.imagenet import default_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    assert default_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # a SLURM task's cores are its own already
    assert default_workers() == 16
    assert _task("imagenet-resnet18").config.workers is None  # the same run identity on every machine
