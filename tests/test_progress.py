"""Progress inside epochs and per-step logs."""

import csv

import pytest

from qatbench.cli import main
from qatbench.results import load_records


def _run(idx_root, out, *extra):
    return main(["run", "--method", "talr", "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke", "--epochs", "3",
                 "--batch-size", "8", "--data-root", str(idx_root), "--no-download", "--out", str(out), *extra])


def test_without_a_terminal_a_progress_line_says_step_loss_speed_and_time_left(idx_root, isolated_data_env,
                                                                                tmp_path, capsys):
    assert _run(idx_root, tmp_path / "runs", "--progress-seconds", "0.000001") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "steps/s" in line]
    assert lines and all(" ETA " in line and "loss " in line for line in lines)
    assert any(line.startswith("[mnist-mlp talr b2 s0] step 60/60 ") for line in lines)  # 3 smoke epochs of 20


def test_the_csv_log_has_every_step_with_its_loss_and_lr_and_the_diagnostics(idx_root, isolated_data_env, tmp_path):
    out = tmp_path / "runs"
    assert _run(idx_root, out, "--log", "csv") == 0
    [path] = out.rglob("*.steps.csv")
    rows = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 61))  # 3 smoke epochs of 20 steps
    assert all(float(r["loss"]) > 0 and float(r["lr"]) > 0 for r in rows)
    flushed = [r for r in rows if r["talr_step_size"]]
    assert flushed and int(flushed[0]["step"]) == 50  # the diagnostics, at each flush


def test_tensorboard_logs_the_scalars(idx_root, isolated_data_env, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    assert _run(idx_root, out, "--log", "tensorboard") == 0
    [folder] = out.rglob("*.tb")
    events = EventAccumulator(str(folder))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 60 and events.Scalars("train/lr")
    [record] = load_records([out])
    for key in ("top1", "transition_rate", "distance_to_levels", "train_loss"):  # what the record holds, per epoch
        values = [s.value for s in events.Scalars(f"epoch/{key}")]
        assert values == pytest.approx([h[key] for h in record.history], rel=1e-6), key


def test_an_unknown_log_kind_is_a_one_line_error(capsys):
    assert main(["run", "--method", "ste", "--task", "mnist-mlp", "--bits", "2", "--log", "wandb"]) == 2
    assert "unknown log kind 'wandb'" in capsys.readouterr().err


def test_on_a_terminal_a_bar_per_epoch(capsys):
    import torch

    from qatbench.progress import Progress

    lines = []
    progress = Progress("run", total_steps=4, interval_s=30, log=lines.append, terminal=True)
    progress.begin_epoch(0, 2, 4, 0)
    for step in range(1, 5):
        progress.step(step, torch.tensor(1.0))
    progress.end_epoch()
    assert "run epoch 1/2" in capsys.readouterr().err and lines == []
