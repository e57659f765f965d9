"""Options are declared once: a field of RunSpec is its flag, its sweep-file key and its part in the identity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qatbench.cli import _build_parser
from qatbench.errors import QatbenchError
from qatbench.options import Settings, identity_fields, make_settings, option, sweep_keys
from qatbench.spec import RunSpec, make_spec, resolve
from qatbench.sweep import load_sweep


@dataclasses.dataclass(frozen=True)
class _WithEma(RunSpec):
    """RunSpec with one more option, added the way every option is: one field."""

    ema: float | None = option(None, "decay of an exponential moving average of the weights", flag="--ema",
                               sweep=True, identity=True, gt=0, lt=1)


def test_a_new_option_is_one_field_on_the_command_line_in_sweep_files_and_in_the_identity(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _build_parser(_WithEma).parse_args(["run", "--help"])
    assert "--ema EMA" in capsys.readouterr().out
    args = _build_parser(_WithEma).parse_args(["run", "--method", "ste", "--task", "mnist-mlp", "--ema", "0.99"])
    assert args.ema == "0.99"  # as given; the schema coerces it
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("task: mnist-mlp\nbits: [2]\nmethods: {ste: {}}\nema: 0.999\n")
    [spec] = load_sweep(sweep, "cpu", spec_cls=_WithEma)
    assert spec.ema == 0.999 and "ema" in sweep_keys(_WithEma) and "ema" not in sweep_keys(RunSpec)
    run = resolve(spec)
    assert run.base_identity["ema"] == 0.999 and "ema" in identity_fields(_WithEma)
    assert resolve(dataclasses.replace(spec, ema=None)).base_identity["ema"] is None
    with pytest.raises(QatbenchError, match="ema=1.5 must be < 1"):
        make_spec({"method": "ste", "task": "mnist-mlp", "bits": 2, "ema": 1.5}, "sweep", cls=_WithEma)


def _identity(**values):
    return resolve(make_spec({"method": "ste", "task": "mnist-mlp", "bits": 2, **values}, "test")).base_identity


def test_the_cpu_threads_are_part_of_a_cpu_runs_identity_and_pinned_by_default():
    assert "threads" not in _identity()  # at its default (1) it is left out: identities made before it stay
    assert _identity(threads=2)["threads"] == 2
    assert _identity(threads=1) == _identity()
    assert _identity(threads=2) != _identity()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA run's identity needs a CUDA device")
def test_a_cuda_runs_identity_holds_no_cpu_threads():
    assert _identity(device="cuda", threads=4)["threads"] is None  # its numbers do not depend on them


def test_how_a_run_is_executed_is_part_of_its_identity():
    plain = _identity()
    assert not {"micro_batch", "processes", "fsdp"} & set(plain)  # at their defaults: left out
    assert _identity(micro_batch=32)["micro_batch"] == 32 and _identity(micro_batch=32) != plain
    assert _identity(processes=2)["processes"] == 2 and _identity(processes=2) != plain
    assert plain["tf32"] is False  # TF32 counts on CUDA only
    assert sweep_keys(RunSpec)["quantizer"] == "scheme" and "processes" not in sweep_keys(RunSpec)


def test_settings_are_checked_by_their_declaration():
    assert make_settings({"checkpoint_minutes": "2.5", "data_root": "x"}).checkpoint_minutes == 2.5
    assert make_settings({"data_root": "x"}).data_root.name == "x"
    with pytest.raises(QatbenchError, match="--checkpoint-minutes='inf' is not a finite number"):
        make_settings({"checkpoint_minutes": "inf"})
    with pytest.raises(QatbenchError, match="--progress-seconds='-1' must be >= 0"):
        make_settings({"progress_seconds": "-1"})
    assert Settings().stale_lock_s == 24 * 3600
