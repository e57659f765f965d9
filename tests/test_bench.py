import json

import pytest

from qatbench.bench import bench, markdown
from qatbench.cli import main
from qatbench.spec import RunSpec


def _specs(*methods):
    return [RunSpec(method=m, task="mnist-mlp", bits=None if m == "fp" else 2, batch_size=64) for m in methods]


def test_every_method_is_timed_against_fp_with_its_memory(idx_root, isolated_data_env):
    rows = {r.method: r for r in bench(_specs("ste", "parq", "fogzo", "talr"), steps=3, warmup=2, rounds=2,
                                       data_root=idx_root, download=False)}
    assert set(rows) == {"fp", "ste", "parq", "fogzo", "talr"}  # fp added as the reference
    assert rows["fp"].ratio == 1.0 and rows["fp"].refresh_ms is None
    assert rows["ste"].target == 1.10 and rows["fogzo"].target > 1.0  # 1 + 2n x forward share
    # per quantized weight (7,840 + 100 of them), STE keeps a 4-byte latent copy and a 4-byte row index;
    # the per-row tables (20 rows: levels, steps, boundaries, padded levels) add under 0.3 bytes a weight
    assert 8 <= rows["ste"].bytes_per_weight < 8.3 and rows["parq"].bytes_per_weight == rows["ste"].bytes_per_weight
    assert rows["talr"].bytes_per_weight == pytest.approx(rows["ste"].bytes_per_weight + 1, abs=0.01)  # d_{t-1}
    assert rows["fogzo"].bytes_per_weight == pytest.approx(rows["ste"].bytes_per_weight + 4, abs=0.02)  # gradient
    assert rows["fp"].bytes_per_weight is None
    assert rows["ste"].refresh_ms > 0 and all(r.step_ms > 0 for r in rows.values())
    table = markdown(list(rows.values()))
    assert table.splitlines()[2].startswith("| fp ")


def test_bench_command_prints_the_table_and_writes_a_record(idx_root, isolated_data_env, tmp_path, capsys):
    assert main(["bench", "--task", "mnist-mlp", "--methods", "ste", "--steps", "2", "--warmup", "1", "--rounds", "1",
                 "--data-root", str(idx_root), "--no-download", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| ste " in out and "| fp " in out
    [path] = tmp_path.glob("mnist-mlp-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["command"].startswith("qatbench bench") and len(record["rows"]) == 2


def test_bench_rejects_zero_steps(capsys):
    assert main(["bench", "--task", "mnist-mlp", "--steps", "0"]) == 2
    assert "--steps 0 must be >= 1" in capsys.readouterr().err


def test_each_methods_peak_is_measured_with_nothing_else_of_the_bench_alive(idx_root, isolated_data_env, monkeypatch):
    import gc
    import weakref

    import qatbench.bench as bench_module

    built, entries = [], []
    build, peak = bench_module._build, bench_module._peak_allocated_mb

    def tracked_build(*args):
        contender = build(*args)
        built.append(weakref.ref(contender.training.model))
        return contender

    def checked_peak(*args):
        gc.collect()
        entries.append(sum(ref() is not None for ref in built))  # models still alive when a peak starts
        return peak(*args)

    monkeypatch.setattr(bench_module, "_build", tracked_build)
    monkeypatch.setattr(bench_module, "_peak_allocated_mb", checked_peak)
    bench(_specs("ste", "parq"), steps=2, warmup=1, rounds=1, data_root=idx_root, download=False)
    assert len(built) >= 3 and entries == [0, 0, 0]
