import json
import os
import socket
import subprocess
import sys

import pytest

from qatbench import checkpoint
from qatbench.cli import main
from qatbench.locks import try_lock
from qatbench.results import RunRecord, write_record


def _record(run_id, status, metric=None, message=None):
    return RunRecord(run_id=run_id, spec={}, method="ste", task="mnist-mlp", bits=2, seed=0, status=status,
                     metric_name="top1", higher_is_better=True, metric=metric, message=message)


def _checkpoint(path, epoch, step):
    checkpoint.save(path, {"run_id": "x", "label": "l", "epochs": 20, "steps_per_epoch": 10,
                           "position": {"epoch": epoch, "step_in_epoch": 3, "step": step}})


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs" / "mnist-mlp"
    write_record(folder / "a-finished.json", _record("aaaaaaaaaaaa", "ok", 84.5))
    write_record(folder / "b-interrupted.json", _record("bbbbbbbbbbbb", "interrupted", message="stopped by SIGTERM"))
    _checkpoint(folder / "b-interrupted.ckpt", 4, 43)
    _checkpoint(folder / "c-killed.ckpt", 7, 73)
    write_record(folder / "d-error.json", _record("dddddddddddd", "error", message="RuntimeError: boom"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "e-stale.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                     "started": "2026-01-01T00:00:00+00:00"}))
    lock = try_lock(folder / "f-running.lock")
    yield tmp_path / "runs"
    lock.release()


def test_status_says_where_every_run_stands(runs, capsys):
    assert main(["status", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = {line.split()[0]: line for line in lines[:-1]}
    assert "finished" in text["mnist-mlp/a-finished"] and "ok top1 84.50" in text["mnist-mlp/a-finished"]
    interrupted = text["mnist-mlp/b-interrupted"]
    assert "interrupted" in interrupted and "epoch 5 of 20 (step 43)" in interrupted
    assert "stopped by SIGTERM" in interrupted and "min old" in interrupted
    assert "epoch 8 of 20" in text["mnist-mlp/c-killed"] and "killed (no record)" in text["mnist-mlp/c-killed"]
    assert "failed" in text["mnist-mlp/d-error"] and "RuntimeError: boom" in text["mnist-mlp/d-error"]
    assert "stale lock" in text["mnist-mlp/e-stale"] and "is gone" in text["mnist-mlp/e-stale"]
    assert "running" in text["mnist-mlp/f-running"] and f"pid {os.getpid()}" in text["mnist-mlp/f-running"]
    assert lines[-1] == "6 runs: 1 finished, 1 failed, 2 interrupted, 1 running, 1 stale lock"


def test_status_as_csv_and_json(runs, capsys):
    import io

    import pandas as pd

    assert main(["status", str(runs), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(frame) == 6 and set(frame["state"]) == {"finished", "failed", "interrupted", "running", "stale lock"}
    assert main(["status", str(runs), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run"]: r["epochs_completed"] for r in rows}["mnist-mlp/c-killed"] == 7


def test_runs_of_a_sweep_that_never_started_are_listed(idx_root, isolated_data_env, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("task: mnist-mlp\nrecipe: smoke\nbits: [2]\nmethods: {ste: {}, parq: {}}\n")
    out = tmp_path / "runs"
    assert main(["run", "--method", "ste", "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke",
                 "--data-root", str(idx_root), "--no-download", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--sweep", str(sweep), "--data-root", str(idx_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("mnist-mlp/parq-b2-s0-") and "never started" in line for line in lines)
    assert lines[-1] == "2 runs: 1 finished, 1 never started"


def test_a_lock_without_a_heartbeat_is_stale_on_any_host(tmp_path, capsys):
    folder = tmp_path / "runs" / "mnist-mlp"
    folder.mkdir(parents=True)
    (folder / "g-empty.lock").write_text("")  # left by a process that died while taking it (a full disk)
    for name, age in (("h-other-host-alive", 60.0), ("i-other-host-gone", 600.0)):
        path = folder / f"{name}.lock"
        path.write_text(json.dumps({"host": "another-host", "pid": 7, "started": "2026-01-01T00:00:00+00:00"}))
        os.utime(path, (path.stat().st_mtime - age, path.stat().st_mtime - age))
    assert main(["status", str(tmp_path / "runs")]) == 0
    text = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[:-1]}
    assert "stale lock" in text["mnist-mlp/g-empty"] and "unreadable or empty" in text["mnist-mlp/g-empty"]
    assert "running" in text["mnist-mlp/h-other-host-alive"]
    assert "stale lock" in text["mnist-mlp/i-other-host-gone"] and "no heartbeat for 10 min" in \
        text["mnist-mlp/i-other-host-gone"]


def test_a_held_lock_beats(tmp_path, monkeypatch):
    import time

    import qatbench.locks as locks

    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    lock = try_lock(tmp_path / "r.lock")
    os.utime(tmp_path / "r.lock", (0, 0))
    time.sleep(0.3)
    assert time.time() - (tmp_path / "r.lock").stat().st_mtime < 5  # refreshed while held
    lock.release()
