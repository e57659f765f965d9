import shutil

import pytest
import torch

from qatbench.errors import QatbenchError
from qatbench.harness import execute
from qatbench.spec import RunSpec, bind_data, make_spec, resolve
from tests.conftest import make_idx_dataset


def _run(method="parq", bits=2, **overrides):
    spec = RunSpec(method=method, task="mnist-mlp", bits=bits, **{"recipe": "smoke", **overrides})
    return resolve(spec)


def _quiet(line):
    pass


def test_identity_changes_with_anything_that_changes_the_run(idx_root, isolated_data_env):
    def run_id(**overrides):
        return bind_data([_run(**overrides)], idx_root, download=False)[0].run_id

    base = run_id()
    assert run_id() == base
    assert run_id(seed=1) != base
    assert run_id(epochs=3) != base
    assert run_id(method_args={"anneal_end": "0.5"}) != base
    assert run_id(granularity="tensor") != base
    assert run_id(bits=4) != base


def test_the_data_is_part_of_the_identity_and_of_the_record(idx_root, tmp_path, isolated_data_env):
    same = shutil.copytree(idx_root, tmp_path / "copy")
    other = make_idx_dataset(tmp_path / "other", seed=1)
    ids = {root: bind_data([_run()], root, download=False)[0].run_id for root in (idx_root, same, other)}
    assert ids[idx_root] == ids[same] != ids[other]  # the same files elsewhere are the same data
    record = execute(_run(), data_root=other, download=False, log=_quiet)
    assert record.data["path"] == str(other) and record.data["files"] == 4
    assert record.data["fingerprint"].startswith("content:") and record.spec["data"] == record.data["fingerprint"]


def test_quantizing_method_needs_bits():
    with pytest.raises(QatbenchError, match="give --bits"):
        _run(bits=None)


@pytest.mark.parametrize("field, value, message", [
    ("granularity", "row", "unknown granularity 'row'"),
    ("scheme", "lsqb", "did you mean 'lsbq'"),
    ("recipe", "papr", "did you mean 'paper'"),
    ("epochs", -1, "epochs=-1 must be >= 0"),
    ("epochs", "3.5", "epochs='3.5' is not a valid int"),
    ("batch_size", True, "batch_size=True is not a valid int"),
    ("lr", -1.0, "lr=-1.0 must be > 0"),
    ("lr", float("nan"), "lr=nan is not a finite number"),
    ("lr", "inf", "lr='inf' is not a finite number"),
    ("seed", -1, "seed=-1 must be >= 0"),
    ("seed", "../../elsewhere", "seed='../../elsewhere' is not a valid int"),
    ("task_args", {"hidden": [1, 2]}, "is not a single value"),
    ("device", "tpu", "invalid device 'tpu'"),
])
def test_bad_spec_fields_are_one_line_errors(field, value, message):
    with pytest.raises(QatbenchError, match=message):
        _run(**{field: value})


def test_speed_options_change_the_identity_and_bad_values_are_rejected():
    assert _run(precision="bf16").base_identity != _run().base_identity
    assert _run(channels_last=True).base_identity != _run().base_identity
    with pytest.raises(QatbenchError, match="precision='fp8': valid choices: auto, bf16, fp32"):
        _run(precision="fp8")
    with pytest.raises(QatbenchError, match="did you mean 'reduce-overhead'"):
        _run(compile="reduce_overhead")


def test_tf32_is_in_the_identity_as_it_acts_off_on_the_cpu():
    assert _run().base_identity["tf32"] is False and _run(tf32=False).base_identity == _run().base_identity


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 and cudnn.benchmark act on CUDA only")
def test_tf32_on_cuda_changes_the_identity_and_the_process_settings():
    from qatbench.step import prepare_device

    fast, exact = _run(device="cuda"), _run(device="cuda", tf32=False)
    assert fast.base_identity["tf32"] is True and exact.base_identity != fast.base_identity
    prepare_device(fast)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    prepare_device(exact)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark


def test_strings_from_a_command_line_or_a_sweep_file_coerce_by_the_schema():
    spec = make_spec({"method": "ste", "task": "mnist-mlp", "bits": "2", "seed": "3", "lr": "1e-2",
                      "epochs": "1e1", "channels_last": "true"}, "test")
    assert (spec.bits, spec.seed, spec.lr, spec.epochs, spec.channels_last) == (2, 3, 0.01, 10, True)


@pytest.mark.parametrize("method, argument, message", [
    ("talr", "initial_lr=-0.1", "initial_lr='-0.1' must be >= 0"),
    ("parq", "steepness=inf", "steepness='inf' is not a finite number"),
    ("parq", "anneal_end=nan", "anneal_end='nan' is not a finite number"),
    ("fogzo", "beta_min=1.5", "beta_min='1.5' must be <= 1"),
    ("fogzo", "samples=0", "samples='0' must be >= 1"),
])
def test_method_hyper_parameters_are_range_checked(method, argument, message):
    key, _, value = argument.partition("=")
    with pytest.raises(QatbenchError, match=message.replace("(", r"\(")):
        _run(method, method_args={key: value})


@pytest.mark.parametrize("recorded", [{"device_type": "cuda", "tf32": True}, {"device_type": "cuda", "tf32": False},
                                      {"device_type": "cpu", "tf32": None}])  # None: a record from before TF32
def test_a_recorded_identity_is_rebuilt_on_the_cpu_to_the_same_run_id(idx_root, isolated_data_env, recorded):
    import json

    from qatbench.results import identity_hash
    from qatbench.spec import resolve_identity

    run = bind_data([_run()], idx_root, download=False)[0]
    identity = json.loads(json.dumps({**run.identity, **recorded}))
    if recorded["tf32"] is None:
        del identity["tf32"]
    rebuilt = resolve_identity(identity)
    rebuilt.data_fingerprint = run.data_fingerprint
    assert json.loads(json.dumps(rebuilt.identity)) == identity and rebuilt.device.type == "cpu"
    assert rebuilt.run_id == identity_hash(identity)  # what `qatbench export RECORD` checks
