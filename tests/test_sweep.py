import re
from pathlib import Path

import pytest

from qatbench.cli import main
from qatbench.errors import QatbenchError
from qatbench.spec import resolve
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
    ("task: mnist-mlp\n", "needs 'methods'"),
    ("methods: {ste: {}}\n", "needs 'task'"),
    ("- just a list\n", "must be a mapping"),
    ("task: [unclosed\n", "not valid YAML"),
    ("task: mnist-mlp\nbits: [0]\nmethods: {ste: {}}\n", "invalid bits '0'"),
    ("task: mnist-mlp\nbits: 2\nmethods: {ste: {}}\n", "bits must be a non-empty list.*got 2"),
    ("task: mnist-mlp\nbits: '12'\nmethods: {ste: {}}\n", "bits must be a non-empty list.*got '12'"),
    ("task: mnist-mlp\nbits: {a: 1}\nmethods: {ste: {}}\n", "bits must be a non-empty list"),
    ("task: mnist-mlp\nbits: [2]\nseeds: 0\nmethods: {ste: {}}\n", "seeds must be a non-empty list"),
    ("task: mnist-mlp\nbits: [2]\nseeds: ['../../x']\nmethods: {ste: {}}\n", "seeds entry '../../x' is not an integer"),
    ("tasks: []\nmethods: {ste: {}}\n", "tasks must be a non-empty list"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {ste: {}}\nlr: .nan\n", "lr=nan is not a finite number"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {ste: {}}\nepochs: three\n", "epochs='three' is not a valid int"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {ste: {}}\nepochs: true\n", "epochs=True is not a valid int"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {ste: {}}\nbits: [4]\n", "key 'bits' is given twice"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {parq: {steepness: [1]}}\n", "methods.parq argument steepness=\\[1\\]"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {parq: {stepness: 3}}\n", "did you mean 'steepness'"),
    ("task: mnist-mlp\nbits: [2]\nmethods: {ste: {}}\ntask_args: {hiden: 3}\n", "did you mean 'hidden'"),
    ("task: mnist-mlp\nbits: [2]\nmethods: [ste]\n", "needs 'methods', a mapping"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(QatbenchError, match=message) as err:
        load_sweep(_write(tmp_path, text), "cpu")
    assert "\n" not in str(err.value) and "sweep.yaml" in str(err.value)


def test_numbers_in_any_yaml_spelling_are_numbers(tmp_path):
    path = _write(tmp_path, "task: mnist-mlp\nbits: [2, '4']\nseeds: [0]\nlr: 1e-2\nepochs: '3'\n"
                            "methods: {parq: {steepness: 1e2}}\n")
    specs = load_sweep(path, "cpu")
    assert [(s.bits, s.lr, s.epochs) for s in specs] == [(2, 0.01, 3), (4, 0.01, 3)]
    assert resolve(specs[0]).method_config.steepness == 100.0


def test_a_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"task: mnist-mlp\nmethods: {ste: {}}\n# \xff\xfe\n")
    with pytest.raises(QatbenchError, match="is not UTF-8 text"):
        load_sweep(path, "cpu")


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


def test_sweep_dry_run_lists_the_runs(tmp_path, capsys, idx_root, isolated_data_env):
    path = _write(tmp_path, "task: mnist-mlp\nbits: [2]\nmethods: {ste: {}, parq: {}}\n")
    assert main(["sweep", str(path), "--dry-run", "--shard", "1/2", "--data-root", str(idx_root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mnist-mlp parq b2 s0: [0-9a-f]{12}", out) and "ste" not in out and "1 runs" in out
    assert main(["sweep", str(path), "--dry-run", "--data-root", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "mnist-mlp ste b2 s0\n" in out and "2 runs (run ids need the data: MNIST not found" in out


@pytest.mark.parametrize("text, message", [
    ("task: mnist-mlp\nbits: [2]\nseeds: [0, 0]\nmethods: {ste: {}}\n", "mnist-mlp ste bits 2 seed 0 is listed 2 times"),
    ("task: mnist-mlp\nbits: [2, '2']\nmethods: {ste: {}}\n", "is listed 2 times"),
    ("tasks: [mnist-mlp, mnist-mlp]\nbits: [2]\nmethods: {ste: {}}\n", "is listed 2 times"),
])
def test_a_run_listed_twice_is_an_error_not_one_run_counted_twice(text, message, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(QatbenchError, match=message):
        load_sweep(path, "cpu")
