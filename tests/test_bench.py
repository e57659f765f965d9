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
    # STE keeps one latent copy of the two weight matrices (7,840 + 100 floats), their level
    # tables (10 + 10 rows of 4 levels) and the tables' midpoints (3 per row)
    extra = (7840 + 100) * 4 + (10 + 10) * (4 + 3) * 4
    assert rows["ste"].state_mb * 2**20 == pytest.approx(rows["fp"].state_mb * 2**20 + extra)
    assert rows["ste"].memory_met and rows["parq"].memory_met
    assert not rows["talr"].memory_met  # its previous level indices: one byte per quantized weight
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
