import json

import pytest

from qatbench.bench import bench, markdown
from qatbench.cli import main
from qatbench.spec import RunSpec


def _specs(*methods):
    return [RunSpec(method=m, task="mnist-mlp", bits=None if m == "fp" else 2, batch_size=64) for m in methods]


def test_every_method_is_timed_against_fp_with_its_memory(idx_root, isolated_data_env):
    result = bench(_specs("ste", "parq", "fogzo", "talr"), steps=3, warmup=2, rounds=2, data_root=idx_root,
                   download=False)
    rows = {r.method: r for r in result.rows}
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
    assert all(r.ratio_low <= r.ratio_high and r.verdict in ("yes", "NO", "noisy: rerun") for r in rows.values())
    assert result.peers == []  # no reference contender asked for
    table = markdown(result)
    assert table.splitlines()[0].startswith("Load average (1 min)") and table.splitlines()[4].startswith("| fp ")


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


@pytest.mark.parametrize("low, high, verdict", [(0.9, 1.05, "yes"), (1.12, 1.3, "NO"), (1.0, 1.2, "noisy: rerun"),
                                                (1.1, 1.1, "yes")])
def test_a_verdict_only_where_the_spread_does_not_straddle_the_target(low, high, verdict):
    from qatbench.bench import Spread

    assert Spread((low + high) / 2, low, high).verdict(1.10) == verdict


def test_a_method_is_timed_against_its_peer_in_the_reference(idx_root, isolated_data_env):
    pytest.importorskip("torchao.prototype.parq", reason="the reference (torchao) is not installed")
    result = bench(_specs("ste", "parq", "torchao-ste", "torchao-parq"), steps=3, warmup=12, rounds=3,
                   data_root=idx_root, download=False)
    peers = {p.rule: p for p in result.peers}
    assert set(peers) == {"ste", "parq"} and peers["parq"].peer == "torchao-parq" and peers["ste"].target == 1.0
    rows = {r.method: r for r in result.rows}
    for rule, peer in peers.items():
        assert peer.step_ms == rows[rule].step_ms and peer.peer_ms == rows[f"torchao-{rule}"].step_ms
        assert peer.ratio_low <= peer.ratio <= peer.ratio_high  # the median of the rounds' ratios, within them
    assert rows["torchao-parq"].refresh_ms > 0  # the reference's own refresh, timed
    assert "Against the PARQ authors' reference" in markdown(result)


def test_a_training_set_smaller_than_one_batch_is_a_one_line_error_not_an_endless_loop(idx_root, isolated_data_env):
    from qatbench.errors import QatbenchError

    specs = [RunSpec(method="ste", task="mnist-mlp", bits=2, batch_size=1024)]  # 512 training images
    with pytest.raises(QatbenchError, match="fewer samples than one batch \\(1024\\): pass a smaller --batch-size"):
        bench(specs, steps=1, warmup=1, rounds=1, data_root=idx_root, download=False)
