"""A run's lifecycle across processes: shared output folders, stop signals, kills and resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qatbench.cli import main
from qatbench.results import load_records, read_record


def qatbench_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m qatbench ARGV` in its own process, its output captured, with SIGINT at its default as in a
    terminal (a shell's background job, e.g. `nohup pytest &`, ignores SIGINT and its children inherit that, so
    Python would never raise KeyboardInterrupt and a Ctrl-C test could not hold)."""
    return subprocess.Popen([sys.executable, "-m", "qatbench", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path_glob: tuple[Path, str], process: subprocess.Popen, timeout: float = 120.0) -> Path:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.rglob(pattern)) if folder.exists() else []
        if found:
            return found[0]
        assert process.poll() is None, f"the process ended first:\n{process.stdout.read()}"
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {folder} after {timeout} s")


def test_three_processes_share_one_sweep_and_train_each_run_once(idx_root, isolated_data_env, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("task: mnist-mlp\nrecipe: smoke\nepochs: 8\nbits: [2]\nseeds: [0, 1]\n"
                     "methods: {fp: {}, ste: {}, parq: {}}\n")
    out = tmp_path / "runs"
    argv = ["sweep", str(sweep), "--data-root", str(idx_root), "--no-download", "--out", str(out)]
    processes = [qatbench_process(*argv) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    trained = [line for text in outputs for line in text.splitlines() if "] ok:" in line]
    assert len(trained) == 6, outputs  # each of the six runs was trained by exactly one process
    records = load_records([out])
    assert len(records) == 6 and all(r.status == "ok" for r in records)
    assert {r.environment["pid"] for r in records} <= {p.pid for p in processes}
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.ckpt"))


STALL_PLUGIN = str(Path(__file__).parent / "plugins" / "stall.py")


def stalled_process(argv: list[str], step: int, marker: Path) -> subprocess.Popen:
    """`qatbench ARGV` in its own process, held before its optimizer step `step` until released or killed."""
    process = qatbench_process(*argv, "--plugin", STALL_PLUGIN,
                               env={"QATBENCH_TEST_STALL_STEP": str(step), "QATBENCH_TEST_STALL_FILE": str(marker)})
    wait_for((marker.parent, marker.name), process)
    return process


@pytest.mark.parametrize("stop_signal, code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGHUP, 129)])
def test_a_stop_signal_checkpoints_records_interrupted_and_a_rerun_resumes(
        stop_signal, code, idx_root, isolated_data_env, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["run", "--method", "parq", "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke", "--epochs", "3",
            "--batch-size", "16", "--data-root", str(idx_root), "--no-download", "--out", str(out)]
    marker = tmp_path / "stalled"
    process = stalled_process(argv, 30, marker)  # the middle of the second epoch of 20 steps
    process.send_signal(stop_signal)
    marker.with_name("stalled.release").touch()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == code, output
    [path] = out.rglob("*.json")
    record = read_record(path)
    assert record.status == "interrupted" and f"stopped by {stop_signal.name} at step 31" in record.message
    assert record.timing["stopped_at_step"] == 31 and path.with_suffix(".ckpt").exists()
    assert main(argv) == 0
    assert f"resumed from {path.with_suffix('.ckpt')} at step 31 (epoch 2" in capsys.readouterr().out
    finished = read_record(path)
    assert finished.status == "ok" and finished.resumed[0]["step"] == 31 and len(finished.history) == 3
    assert not path.with_suffix(".ckpt").exists()  # deleted once the record is written
