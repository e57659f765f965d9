from pathlib import Path

import pytest

from qatbench.cli import main
from qatbench.errors import QatbenchError
from qatbench.harness import resolve
from qatbench.quant import TERNARY
from qatbench.sweep import load_sweep, shard, shared_method_args

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_file_expands_to_every_combination_with_per_method_arguments(tmp_path):
    path = _write(tmp_path, "task: mnist-mlp\nbits: [1, T]\nseeds: [0, 1]\nrecipe: smoke\n"
                            "methods:\n  fp: {}\n  parq: {steepness: 100}\n")
    specs = load_sweep(path, "cpu")
    assert len(specs) == 2 + 2 * 2  # fp once per seed
    parq = [s for s in specs if s.method == "parq"]
    assert {s.bits for s in parq} == {1, TERNARY} and parq[0].method_args == {"steepness": 100}
    assert resolve(parq[0]).method_config.steepness == 100.0


@pytest.mark.parametrize("text, message", [
    ("task: mnist-mlp\nmethod: {ste: {}}\n", "unknown key 'method'.*did you mean 'methods'"),
    ("task: mnist-mlp\n", "needs 'task'"),
    ("- just a list\n", "must be a mapping"),
    ("task: [unclosed\n", "not valid YAML"),
    ("task: mnist-mlp\nbits: [0]\nmethods: {ste: {}}\n", "invalid bits '0'"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(QatbenchError, match=message):
        load_sweep(_write(tmp_path, text), "cpu")


def test_shards_partition_the_runs():
    runs = list(range(10))
    parts = [shard(runs, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == runs and parts[0] == [0, 3, 6, 9]
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(QatbenchError, match="invalid --shard"):
            shard(runs, bad)


def test_command_line_method_args_go_to_the_methods_that_declare_them():
    args = shared_method_args(["ste", "parq"], {"steepness": "5", "quant_period": "3"})
    assert args == {"ste": {"quant_period": "3"}, "parq": {"steepness": "5", "quant_period": "3"}}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_resolves(config):
    specs = load_sweep(config, "cpu")
    assert specs
    for spec in specs:
        resolve(spec)


def test_sweep_dry_run_lists_the_runs(tmp_path, capsys):
    path = _write(tmp_path, "task: mnist-mlp\nbits: [2]\nmethods: {ste: {}, parq: {}}\n")
    assert main(["sweep", str(path), "--dry-run", "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert "mnist-mlp parq b2 s0" in out and "ste" not in out and "1 runs" in out
