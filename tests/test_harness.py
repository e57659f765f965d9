import dataclasses
import json
import time

import pytest
import torch

from qatbench.errors import QatbenchError
from qatbench.cli import main
from qatbench.harness import execute, run_all
from qatbench.step import micro_batches
from qatbench.spec import RunSpec, resolve
from qatbench.registry import METHODS
from qatbench.results import read_record
from tests.conftest import assert_same_training


def _run(method="parq", bits=2, **overrides):
    spec = RunSpec(method=method, task="mnist-mlp", bits=bits, **{"recipe": "smoke", **overrides})
    return resolve(spec)


def _quiet(line):
    pass


def test_record_holds_metric_timings_memory_exactness_and_provenance(idx_root, isolated_data_env):
    record = execute(_run(), data_root=idx_root, download=False, log=_quiet, command="qatbench run ...")
    assert record.status == "ok" and record.message is None
    assert 0 <= record.metric <= 100 and record.best_epoch_metric is not None
    assert (record.num_train, record.num_test) == (512, 256)
    assert record.exactness["passed"] is True
    assert record.exactness["tensors"]["1.weight"] == {"distinct": 4, "allowed": 4}
    timing = record.timing
    assert timing["steady_steps"] == 4 - timing["warmup_steps"] and timing["steady_step_ms"] > 0
    assert {"warmup_s", "eval_s", "train_s", "total_s"} <= set(timing)
    assert record.memory["peak_rss_mb"] > 0
    assert record.environment["torch"] == torch.__version__ and record.command == "qatbench run ..."
    assert record.history[0]["epoch"] == 1 and "inv_slope" in record.history[0]


def test_full_precision_ignores_bits_and_skips_the_exactness_check(idx_root, isolated_data_env):
    record = execute(_run("fp", None), data_root=idx_root, download=False, log=_quiet)
    assert record.status == "ok" and record.bits is None
    assert record.exactness == {"passed": None, "reason": "full-precision method"}


class _Explodes(METHODS.get("ste")):
    def step(self, closure=None):
        if self.steps == 2:
            raise RuntimeError("boom")
        super().step(closure)


class _Diverges(METHODS.get("ste")):
    def step(self, closure=None):
        super().step(closure)
        self.params[0].data.fill_(float("nan"))


class _Interrupted(METHODS.get("ste")):
    def step(self, closure=None):
        raise KeyboardInterrupt


def test_a_crash_is_recorded_with_its_status_and_the_sweep_goes_on(idx_root, isolated_data_env, tmp_path):
    runs = [dataclasses.replace(_run(seed=0), method_cls=_Explodes), _run(seed=1)]
    records = run_all(runs, tmp_path / "out", idx_root, download=False, log=_quiet)
    assert [r.status for r in records] == ["error", "ok"]
    assert records[0].message == "RuntimeError: boom"
    assert len(list((tmp_path / "out").rglob("*.json"))) == 2


def test_nan_loss_is_recorded_as_diverged(idx_root, isolated_data_env):
    record = execute(dataclasses.replace(_run(), method_cls=_Diverges), data_root=idx_root, download=False, log=_quiet)
    assert record.status == "diverged" and "non-finite" in record.message and record.metric is None


def test_ctrl_c_keeps_finished_records_and_records_the_interrupted_run(idx_root, isolated_data_env, tmp_path):
    runs = [_run(seed=0), dataclasses.replace(_run(seed=1), method_cls=_Interrupted), _run(seed=2)]
    with pytest.raises(KeyboardInterrupt):
        run_all(runs, tmp_path / "out", idx_root, download=False, log=_quiet)
    statuses = sorted(read_record(p).status for p in (tmp_path / "out").rglob("*.json"))
    assert statuses == ["interrupted", "ok"]


def test_existing_finished_records_are_skipped_unless_forced(idx_root, isolated_data_env, tmp_path):
    out = tmp_path / "out"
    first = run_all([_run()], out, idx_root, download=False, log=_quiet)[0]
    lines = []
    again = run_all([_run()], out, idx_root, download=False, log=lines.append)[0]
    assert again.created == first.created and "skipped" in lines[0]
    forced = run_all([_run()], out, idx_root, download=False, force=True, log=_quiet)[0]
    assert forced.timing["total_s"] != first.timing["total_s"]


def test_unfinished_records_are_rerun(idx_root, isolated_data_env, tmp_path):
    out = tmp_path / "out"
    run_all([dataclasses.replace(_run("ste"), method_cls=_Explodes)], out, idx_root, download=False, log=_quiet)
    rerun = run_all([_run("ste")], out, idx_root, download=False, log=_quiet)[0]
    assert rerun.status == "ok"
    [path] = out.rglob("*.json")
    assert json.loads(path.read_text())["status"] == "ok"


def test_same_seed_gives_the_same_result(idx_root, isolated_data_env):
    a = execute(_run(), data_root=idx_root, download=False, log=_quiet)
    b = execute(_run(), data_root=idx_root, download=False, log=_quiet)
    assert a.metric == b.metric and a.history[0]["train_loss"] == b.history[0]["train_loss"]


def test_missing_data_raises_the_one_line_error(tmp_path, isolated_data_env, monkeypatch):
    monkeypatch.setattr("qatbench.data.SYSTEM_DATA_DIR", tmp_path / "system")
    with pytest.raises(QatbenchError, match="MNIST not found"):
        execute(_run(), data_root=tmp_path / "empty", download=False, log=_quiet)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_records_peak_gpu_memory(idx_root, isolated_data_env):
    record = execute(_run(device="cuda"), data_root=idx_root, download=False, log=_quiet)
    assert record.status == "ok" and record.exactness["passed"] is True
    assert record.memory["peak_allocated_mb"] > 0 and record.memory["peak_reserved_mb"] >= record.memory["peak_allocated_mb"]
    assert record.environment["cuda"] is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["parq", "talr"])
@pytest.mark.parametrize("options", [{"compile": "reduce-overhead"}, {"precision": "bf16", "act_bits": 2}])
def test_cuda_graphs_and_autocast_train_to_an_exactly_quantized_model(method, options, idx_root, isolated_data_env):
    record = execute(_run(method, device="cuda", **options), data_root=idx_root, download=False, log=_quiet)
    assert record.status == "ok" and record.exactness["passed"] is True and record.memory["peak_allocated_mb"] > 0


@pytest.mark.parametrize("options", [{"precision": "bf16"}, {"compile": "default"}])
def test_speed_options_train_to_an_exactly_quantized_model(options, idx_root, isolated_data_env):
    record = execute(_run(**options), data_root=idx_root, download=False, log=_quiet)
    assert record.status == "ok" and record.exactness["passed"] is True
    assert record.spec["precision"] == options.get("precision", "fp32")
    assert record.spec["compile"] == options.get("compile", "none")
    assert record.timing["warmup_s"] > 0  # compilation is charged to the warm-up, not the steady state


def test_probes_replay_the_steps_dropout_and_leave_batchnorm_statistics_alone():
    import copy

    from qatbench.step import Training, train_step
    from qatbench.method import Method

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    probes = []

    class Probing(Method):  # probes twice at the weights the gradient was taken at
        def extra_forward_passes(self):
            return 2

        def step(self, closure=None):
            probes.extend([closure(), closure()])
            self.steps += 1

    method = Probing(None, torch.optim.SGD(model.parameters(), lr=0.0), None, 1, torch.Generator())

    def compute_loss(inputs, targets):
        return torch.nn.functional.cross_entropy(model(inputs), targets)

    training = Training(model, compute_loss, method, None, 1, 1, compute_loss)
    inputs, targets = torch.randn(16, 6), torch.randint(0, 3, (16,))
    rng = torch.get_rng_state()
    loss = train_step(training, inputs, targets)
    after_step = torch.get_rng_state()
    torch.set_rng_state(rng)
    reference(inputs)  # one training forward: what the statistics and the generator must show afterwards
    assert torch.equal(probes[0], loss.detach()) and torch.equal(probes[1], loss.detach())  # the same masks
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name)), name
    assert torch.equal(after_step, torch.get_rng_state())  # the probes drew nothing more


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "fp", "ste", "parq", "fogzo", "--task", "mnist-mlp", "--recipe", "smoke",
            "--epochs", "5", "--bits", "2", "--data-root", str(idx_root), "--no-download"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert main([*argv, "--out", str(tmp_path / "parts"), "--micro-batch", "48"]) == 0  # 48 + 48 + 32 of 128
    parts = assert_same_training(tmp_path / "whole", tmp_path / "parts")
    assert all(r.environment["micro_batch"] == 48 and r.environment["accumulation_steps"] == 3 for r in parts)


def test_micro_batches_share_the_batch_by_size():
    inputs, targets = torch.arange(10.0)[:, None], torch.arange(10)
    parts = micro_batches(inputs, targets, 4)
    assert [len(x) for x, _, _ in parts] == [4, 4, 2] and [s for _, _, s in parts] == [0.4, 0.4, 0.2]
    assert torch.equal(torch.cat([y for _, y, _ in parts]), targets)
    [(whole, _, share)] = micro_batches(inputs, targets, 10)
    assert whole is inputs and share == 1.0


class _SlowBatches:
    """A task's training batches, each one handed over late, as from a loader whose workers cannot keep up
    (it keeps its `waited_s`, as `DeviceLoader` does)."""

    def __init__(self, batches, delay_s):
        self.batches, self.delay_s, self.waited_s = batches, delay_s, 0.0

    def __getattr__(self, name):
        return getattr(self.batches, name)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay_s)
            self.waited_s += self.delay_s
            yield batch


def test_the_time_spent_waiting_on_the_loader_is_recorded_and_warned_about(idx_root, isolated_data_env, monkeypatch):
    run = _run()
    load_data = run.task.load_data

    def slow(*args, **kwargs):
        data = load_data(*args, **kwargs)
        data.train = _SlowBatches(data.train, 0.2)
        return data

    monkeypatch.setattr(run.task, "load_data", slow)
    lines = []
    record = execute(run, data_root=idx_root, download=False, log=lines.append)
    assert record.status == "ok" and record.timing["data_wait_s"] >= 4 * 0.2  # 4 steps, each waited for
    assert 0.1 < record.timing["data_wait_share"] <= 1
    assert any("waited on its data loader" in line and "workers" in line for line in lines), lines


def test_a_loader_that_keeps_up_is_not_warned_about(idx_root, isolated_data_env):
    lines = []
    record = execute(_run(), data_root=idx_root, download=False, log=lines.append)
    assert record.timing["data_wait_s"] == 0  # the data lives on the device
    assert not any("waited on its data loader" in line for line in lines)


def test_the_memory_peak_starts_once_the_data_is_resident(idx_root, isolated_data_env, monkeypatch):
    import qatbench.loop as loop

    run, events = _run(), []
    load_data = run.task.load_data
    start, build_training = loop.PeakMemory.start, loop.build_training
    monkeypatch.setattr(run.task, "load_data", lambda *a, **k: (events.append("data"), load_data(*a, **k))[1])
    monkeypatch.setattr(loop.PeakMemory, "start", lambda self: (events.append("peak reset"), start(self))[1])
    monkeypatch.setattr(loop, "build_training",
                        lambda *a, **k: (events.append("model"), build_training(*a, **k))[1])
    assert execute(run, data_root=idx_root, download=False).status == "ok"
    assert events == ["data", "peak reset", "model"]
