"""Sweeps through executors: a local process pool, submitit's debug executor, and the SLURM job submitit
would submit (inspected through a stand-in `sbatch`)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qatbench.cli import main
from qatbench.executors import core_shares, device_slots
from qatbench.results import load_records, read_record

from .test_lifecycle import stalled_process

SWEEP = "task: mnist-mlp\nrecipe: smoke\nbits: [2]\nseeds: [0, 1]\nmethods: {ste: {}, parq: {}}\n"


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def _records_with_logs(out):
    records = load_records([out])
    for record in records:
        log = out / record.task / record.export["file"].replace(".safetensors", ".log")
        assert f"[{record.task} {record.method} b2 s{record.seed}] ok:" in log.read_text()  # the run's output, kept
    return records


def test_a_local_pool_of_two_workers_runs_a_four_run_sweep(sweep, idx_root, isolated_data_env, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["sweep", str(sweep), "--executor", "local", "--workers", "2", "--data-root", str(idx_root),
                 "--no-download", "--out", str(out)]) == 0
    assert "4 runs on 2 workers, 4 ok" in capsys.readouterr().out
    records = _records_with_logs(out)
    assert len(records) == 4 and all(r.status == "ok" for r in records)
    assert len({r.environment["pid"] for r in records}) <= 2 and os.getpid() not in {r.environment["pid"] for r in records}
    # each worker on its share of the cores; each run with the CPU threads its identity says
    assert all(r.environment["cpu_threads"] == r.spec.get("threads", 1) == 1 for r in records)


def test_submitits_debug_executor_runs_the_same_jobs(sweep, idx_root, isolated_data_env, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "runs"
    assert main(["sweep", str(sweep), "--executor", "debug", "--data-root", str(idx_root), "--no-download",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("job DEBUG_") == 4 and "4 jobs submitted (debug)" in printed
    assert len(_records_with_logs(out)) == 4


def test_the_slurm_job_array_that_would_be_submitted(sweep, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    captured = tmp_path / "sbatch-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # a stand-in: keeps the submission file and answers as SLURM does
    sbatch.write_text(f"#!{sys.executable}\nimport shutil, sys\nshutil.copy(sys.argv[-1], {str(captured)!r})\n"
                      "print('Submitted batch job 4242')\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    srun = bin_dir / "srun"  # submitit checks that it exists; the job would call it on the cluster
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "runs"
    assert main(["sweep", str(sweep), "--executor", "slurm", "--partition", "gpu", "--time-min", "120",
                 "--gpus-per-run", "2", "--array-parallelism", "3", "--slurm-arg", "account=qat", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines()[:4]] == [f"job 4242_{i}" for i in range(4)]
    script = captured.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --array=0-3%3",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --signal=USR2@120", "#SBATCH --account=qat"):
        assert line in script, (line, script)
    assert "submitit.core._submit" in script and str(out / ".submitit") in script


def test_slurm_needs_a_partition_a_time_limit_and_a_slurm_machine(sweep, tmp_path, capsys, monkeypatch):
    assert main(["sweep", str(sweep), "--executor", "slurm", "--out", str(tmp_path / "o")]) == 2
    assert "needs --partition P and --time-min T" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert main(["sweep", str(sweep), "--executor", "slurm", "--partition", "p", "--time-min", "5",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatbench: error: --executor slurm: ") and err.count("\n") == 1


def test_workers_are_dealt_disjoint_device_groups(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert device_slots("cuda", 4, 1) == ["0", "1", "2", "3"]
    assert device_slots("cuda", 8, 1) == ["0", "1", "2", "3", "0", "1", "2", "3"]  # two workers per GPU
    assert device_slots("cuda", 2, 2) == ["0,1", "2,3"]
    assert device_slots("cpu", 3, 1) == [None, None, None]


def test_pool_workers_get_disjoint_shares_of_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16, 32)))
    assert core_shares(4) == [list(range(16, 20)), list(range(20, 24)), list(range(24, 28)), list(range(28, 32))]
    assert core_shares(3) == [list(range(16, 21)), list(range(21, 26)), list(range(26, 32))]
    assert core_shares(20)[15:] == [[31], [16], [17], [18], [19]]  # more workers than cores: shared


def test_a_slurm_job_preempted_by_usr2_checkpoints_then_hands_over_to_submitits_requeue(
        idx_root, isolated_data_env, tmp_path, monkeypatch):
    import signal

    import qatbench.loop as loop
    from qatbench.executors import RunJob, Settings
    from qatbench.signals import Stopped
    from qatbench.spec import RunSpec

    pytest.importorskip("submitit")
    real_step, calls = loop.train_step, []

    def preempted_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # what SLURM sends before a preemption or the time limit
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", preempted_at_step_three)
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # stands for submitit's
    try:
        job = RunJob(Settings(out=tmp_path / "runs", data_root=idx_root, download=False), per_run=1)
        spec = RunSpec(method="ste", task="mnist-mlp", bits=2, recipe="smoke")
        with pytest.raises(Stopped):
            job(spec)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert requeued == [signal.SIGUSR2]
    [record] = load_records([tmp_path / "runs"])
    assert record.status == "interrupted" and "SIGUSR2 at step 3" in record.message
    assert list((tmp_path / "runs").rglob("*.ckpt"))  # the requeued job resumes from it
    resubmission = job.checkpoint(spec)
    assert resubmission.args == (spec,) and isinstance(resubmission.function, RunJob)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has ended
    except (FileNotFoundError, IndexError):
        return False


def _wait_for_stalls(marker, count, timeout=60.0):
    """Until `count` processes have stopped at the stall plugin's step (a line each in `marker`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(marker.read_text().splitlines()) < count:
        time.sleep(0.05)
    assert len(marker.read_text().splitlines()) == count


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes' states from /proc")
@pytest.mark.parametrize("stop_signal, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "Ctrl-C"])
def test_a_stop_signal_to_the_pool_owner_checkpoints_the_started_runs_and_drops_the_rest(
        stop_signal, code, sweep, idx_root, isolated_data_env, tmp_path):
    out = tmp_path / "runs"
    marker = tmp_path / "stalled"
    sweep.write_text(SWEEP + "epochs: 3\n")
    owner = stalled_process(["sweep", str(sweep), "--executor", "local", "--workers", "2", "--data-root",
                             str(idx_root), "--no-download", "--out", str(out)], 1, marker)
    _wait_for_stalls(marker, 2)  # both workers hold a run at its step 1
    owner.send_signal(stop_signal)  # to the owner alone, as `kill PID`, a scheduler or `kill -INT` sends it
    time.sleep(1.5)  # the owner passes it on while the runs are held
    marker.with_name("stalled.release").touch()
    output = owner.communicate(timeout=120)[0]
    assert owner.returncode == code, output
    records = [read_record(path) for path in out.rglob("*.json")]
    assert len(records) == 2 and all(r.status == "interrupted" for r in records), output
    assert all(p.with_suffix(".ckpt").exists() for p in out.rglob("*.json"))
    deadline = time.monotonic() + 30
    while any(_alive(r.environment["pid"]) for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(r.environment["pid"]) for r in records)  # no worker is left behind


def test_a_stop_to_a_pool_of_two_rank_runs_goes_through_torchruns_agent_to_a_checkpoint(
        idx_root, isolated_data_env, tmp_path):
    # --gpus-per-run 2 on the CPU: each run is 2 gloo ranks under torchrun's agent, which handles SIGTERM itself
    out, marker, sweep = tmp_path / "runs", tmp_path / "stalled", tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP.replace("{ste: {}, parq: {}}", "{ste: {}}") + "epochs: 3\n")
    owner = stalled_process(["sweep", str(sweep), "--executor", "local", "--workers", "1", "--gpus-per-run", "2",
                             "--data-root", str(idx_root), "--no-download", "--out", str(out)], 1, marker)
    _wait_for_stalls(marker, 2)  # both ranks of the first run hold at its step 1
    owner.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    marker.with_name("stalled.release").touch()
    output = owner.communicate(timeout=120)[0]
    assert owner.returncode == 143, output
    [record] = [read_record(path) for path in out.rglob("*.json")]  # the second run never started
    assert record.status == "interrupted" and record.environment["world_size"] == 2, output
    assert len(list(out.joinpath(record.task).glob("*.ckpt"))) == 1
    assert "a run was stopped by SIGTERM" in output and "failed" not in output  # the agent's exception, translated


def test_nproc_with_an_executor_is_refused_for_gpus_per_run(sweep, tmp_path, capsys):
    assert main(["sweep", str(sweep), "--executor", "local", "--nproc", "2", "--out", str(tmp_path)]) == 2
    assert "give every run N processes with --gpus-per-run N" in capsys.readouterr().err


def _stalled_pids(marker) -> list[int]:
    return [int(line.split()[0]) for line in marker.read_text().splitlines()]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes' states from /proc")
def test_workers_do_not_outlive_a_pool_owner_killed_with_sigkill(sweep, idx_root, isolated_data_env, tmp_path):
    out, marker = tmp_path / "runs", tmp_path / "stalled"
    sweep.write_text(SWEEP + "epochs: 3\n")
    owner = stalled_process(["sweep", str(sweep), "--executor", "local", "--workers", "2", "--data-root",
                             str(idx_root), "--no-download", "--out", str(out)], 1, marker)
    _wait_for_stalls(marker, 2)
    workers = _stalled_pids(marker)
    owner.kill()  # SIGKILL: the owner can pass nothing on
    owner.wait(timeout=30)
    time.sleep(1.5)  # the workers notice and stop their runs
    marker.with_name("stalled.release").touch()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    records = [read_record(path) for path in out.rglob("*.json")]
    assert len(records) == 2 and all(r.status == "interrupted" and "SIGTERM" in r.message for r in records)
    assert all(p.with_suffix(".ckpt").exists() for p in out.rglob("*.json"))  # they resume from there


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes' states from /proc")
def test_a_pool_outlives_a_worker_killed_by_the_oom_killer(sweep, idx_root, isolated_data_env, tmp_path):
    out, marker = tmp_path / "runs", tmp_path / "stalled"
    sweep.write_text(SWEEP + "epochs: 3\n")
    argv = ["sweep", str(sweep), "--executor", "local", "--workers", "2", "--data-root", str(idx_root),
            "--no-download", "--out", str(out)]
    owner = stalled_process(argv, 1, marker)
    _wait_for_stalls(marker, 2)
    victim = _stalled_pids(marker)[0]
    os.kill(victim, signal.SIGKILL)  # what the kernel's OOM killer does
    time.sleep(1.0)
    marker.with_name("stalled.release").touch()
    output = owner.communicate(timeout=180)[0]
    assert owner.returncode == 1 and "4 runs on 2 workers, 3 ok" in output, output
    records = [read_record(path) for path in out.rglob("*.json")]
    [dead] = [r for r in records if r.status != "ok"]
    assert len(records) == 4 and dead.status == "error" and "killed by SIGKILL" in dead.message
    assert "OOM killer" in dead.message
    assert main(argv) == 0  # the next sweep trains the run again (from its last checkpoint, if it wrote one)
    assert all(read_record(path).status == "ok" for path in out.rglob("*.json"))
