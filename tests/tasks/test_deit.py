import importlib.util
import sys

import pytest

from qatbench.cli import main
from qatbench.params import build_config
from qatbench.registry import TASKS
from tests.conftest import load_task_data, make_image_folder, smoke_run

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), per_class_train=6)


def _task(name, **options):
    cls = TASKS.get(name)
    return cls(build_config(cls.Config, options, name))


@pytest.mark.parametrize("name, params", [("imagenet-deit-tiny", 5_717_416), ("imagenet-deit-small", 22_050_664)])
@needs_timm
def test_timm_models_and_parameter_counts(name, params):
    model = _task(name).build_model()
    assert sum(p.numel() for p in model.parameters()) == params


@needs_timm
def test_attention_and_mlp_weights_are_quantized_patch_embed_norms_and_head_are_not():
    task = _task("imagenet-deit-tiny")
    model = task.build_model()
    chosen = [n for n, p in model.named_parameters() if task.is_quantized(n, p)]
    assert len(chosen) == 12 * 4
    assert {n.split(".", 2)[2] for n in chosen} == {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
    groups = task.param_groups(model)
    no_decay = {id(p) for p in groups[2]["params"]}
    assert groups[2]["weight_decay"] == 0.0 and id(model.pos_embed) in no_decay and id(model.head.weight) not in no_decay


@needs_timm
def test_mixup_gives_soft_targets_and_the_loss_takes_them(image_root, isolated_data_env):
    import torch

    task = _task("imagenet-deit-tiny", num_classes=3, image_size=32, workers=0)
    data = load_task_data(task, image_root, 6, 0)
    images, targets = next(iter(data.train))
    assert images.shape == (6, 3, 32, 32) and targets.shape == (6, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    loss = task.loss(torch.zeros(6, 3), targets)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)


@needs_timm
@pytest.mark.parametrize("task", ["imagenet-deit-tiny", "imagenet-deit-small"])
def test_smoke_run_through_the_cli(task, image_root, isolated_data_env, tmp_path):
    smoke_run(tmp_path, "--method", "parq", "--task", task, "--bits", "2", "--batch-size", "6", "--task-arg",
              "num_classes=3", "--task-arg", "image_size=32", "--task-arg", "workers=0", "--data-root", str(image_root))


def test_without_timm_the_task_names_the_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    assert main(["run", "--method", "fp", "--task", "imagenet-deit-tiny", "--recipe", "smoke",
                 "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "needs timm: pip install 'qatbench[vision]'" in capsys.readouterr().err
