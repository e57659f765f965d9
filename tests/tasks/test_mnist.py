import pytest
import torch

from qatbench.harness import execute
from qatbench.spec import RunSpec, resolve
from qatbench.params import build_config
from qatbench.registry import TASKS
from tests.conftest import REAL_DATA, load_task_data


def _task(name="fashion-mnist-mlp", **options):
    cls = TASKS.get(name)
    return cls(build_config(cls.Config, options, name))


def test_mlp_has_fogzo_parameter_count():
    model = _task().build_model()
    assert sum(p.numel() for p in model.parameters()) == 7960  # 784*10 + 10 + 10*10 + 10


def test_hidden_width_is_a_task_option():
    model = _task(hidden=64).build_model()
    assert model[1].out_features == 64


def test_every_linear_weight_is_quantized_and_biases_are_not():
    task = _task()
    model = task.build_model()
    chosen = [n for n, p in model.named_parameters() if task.is_quantized(n, p)]
    assert chosen == ["1.weight", "3.weight"]
    groups = task.param_groups(model)
    assert [g["quant"] for g in groups] == [True, False]
    assert [len(g["params"]) for g in groups] == [2, 2]


def test_loader_reads_idx_files_onto_the_device(idx_root, isolated_data_env):
    task = _task()
    data = load_task_data(task, idx_root, 64, 0)
    assert (data.num_train, data.num_test) == (512, 256)
    batches = list(data.train)
    assert len(batches) == 8 and batches[0][0].shape == (64, 784) and batches[0][1].dtype == torch.long
    # standardized with the training split's own statistics
    full = torch.cat([x for x, _ in batches])
    assert abs(full.mean().item()) < 1e-4 and abs(full.std().item() - 1) < 1e-3
    assert sum(len(y) for _, y in data.test) == 256


def test_shuffling_is_deterministic_under_a_seed(idx_root, isolated_data_env):
    task = _task()
    def first_labels(seed):
        data = load_task_data(task, idx_root, 64, seed)
        return next(iter(data.train))[1]
    assert torch.equal(first_labels(3), first_labels(3))
    assert not torch.equal(first_labels(3), first_labels(4))


@REAL_DATA
def test_real_fashion_mnist_from_the_debian_package(isolated_data_env):
    data = load_task_data(_task(), None, 128, 0)
    assert (data.num_train, data.num_test) == (60000, 10000)
    labels = torch.cat([y for _, y in data.test])
    assert torch.bincount(labels).tolist() == [1000] * 10


@REAL_DATA
@pytest.mark.parametrize("method", ["fp", "ste", "binaryrelax", "parq"])
def test_every_method_reduces_the_loss_on_real_fashion_mnist(method, isolated_data_env):
    spec = RunSpec(method=method, task="fashion-mnist-mlp", bits=None if method == "fp" else 2, recipe="smoke",
                   epochs=5, method_args={"anneal_end": "0.5"} if method in ("binaryrelax", "parq") else {})
    record = execute(resolve(spec), download=False, log=lambda line: None)
    assert record.status == "ok"
    losses = [h["train_loss"] for h in record.history]
    assert losses[-1] < losses[0] < 2.3  # below the first epoch's mean, itself below chance (ln 10)
    assert record.metric > 65.0  # after 100 steps of 128 images; chance is 10 %
    if method != "fp":
        assert record.exactness["passed"] is True


@REAL_DATA
@pytest.mark.parametrize("method", ["fogzo", "nspsa", "talr"])
def test_zeroth_order_and_talr_methods_train_through_the_cli(method, isolated_data_env, tmp_path, capsys):
    from qatbench.cli import main
    from qatbench.results import load_records

    out = tmp_path / "runs"
    # plain n-SPSA diverges at the recipe's LR (its 1-sample estimate has variance ~ d |grad|^2)
    lr = ["--lr", "0.0002"] if method == "nspsa" else []
    assert main(["run", "--method", method, "--task", "fashion-mnist-mlp", "--bits", "2", "--recipe", "smoke",
                 "--epochs", "5", "--no-download", "--out", str(out), *lr]) == 0
    [record] = load_records([out])
    assert record.status == "ok" and record.exactness["passed"] is True
    losses = [h["train_loss"] for h in record.history]
    assert losses[-1] < min(losses[0], 2.3)  # it learns, to below chance (ln 10), even n-SPSA at its small LR
    assert all(0 <= h["transition_rate"] <= 1 and h["distance_to_levels"] >= 0 for h in record.history)


@REAL_DATA
def test_full_precision_records_transition_diagnostics_too(isolated_data_env):
    record = execute(resolve(RunSpec(method="fp", task="fashion-mnist-mlp", bits=None, recipe="smoke")),
                     download=False, log=lambda line: None)
    assert 0 < record.history[0]["transition_rate"] < 1 and record.history[0]["distance_to_levels"] > 0
