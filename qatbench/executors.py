"""Many runs at once: a sweep on this machine's devices (a process pool) or on a SLURM cluster (submitit).

The unit of work is one run (`run_one`): it resolves the run, keeps its output (every line,
warnings and library messages included) in `<record>.log` beside its record, and goes
through `run_all` like any run: locked (so overlapping sweeps never train a run twice),
checkpointed, resumed. A run that needs several processes (`--gpus-per-run G > 1`) is
started by torchrun's own launcher (`torch.distributed.launcher`), one rank per device.

- `local`: a pool of K worker processes (`qatbench.pool`: it outlives a worker killed by the
  OOM killer, and no worker outlives it); each worker is pinned to its own GPU (or group of G
  GPUs) when there are several, or several workers share one (`--workers` above the number of
  GPUs: two runs share one H100 at about 1.9x the throughput of one).
- `slurm`: one submitit job-array task per run (`map_array`), G tasks per job for a DDP run
  (submitit's `TorchDistributedEnvironment` sets the ranks). A preempted or timed-out job
  gets SIGUSR2 from SLURM (`--signal=USR2@120`): the run checkpoints at its next step,
  records `interrupted`, and submitit requeues it; the requeued job resumes from the
  checkpoint.
- `debug`: submitit's debug executor: the same jobs, run one after the other in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import open_append
from .errors import QatbenchError
from .distributed import World
from .options import Settings
from .pool import Outcome, run_tasks
from .signals import STOP_SIGNALS, Stopped, stop_signals

EXECUTORS = ("inline", "local", "slurm", "debug")
SLURM_SIGNAL_DELAY_S = 120  # seconds between SLURM's warning signal and the kill: time to reach a step and checkpoint


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr to `path`, appended, for the duration of the block: Python's
    streams, and the file descriptors too, so that C libraries' messages go there as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open_append(path) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_one(spec: Any, settings: Settings, stop_signals: tuple[int, ...] = STOP_SIGNALS) -> str:
    """Train one run in this process (a rank of it, under a launcher), its output in `<record>.log`;
    a one-line summary."""
    from .distributed import init_distributed, world_from_environment
    from .harness import RunFiles, RunOptions, bind_once, run_all, summary_line
    from .registry import load_plugin_file
    from .spec import resolve

    for plugin in settings.plugins:
        load_plugin_file(plugin)
    world = world_from_environment()
    run = resolve(dataclasses.replace(spec, device=init_distributed(world, spec.device), processes=world.size))
    bind_once([run], settings.data_root, settings.download, world)
    files = RunFiles.of(settings.out, run)
    options = RunOptions.of(settings, log=lambda line: print(line, flush=True), world=world,
                            stop_signals=stop_signals)
    with output_to(files.record.with_suffix(".log")):
        records = run_all([run], options=options)
    if not records:
        return f"[{run.label}] skipped: held by another process ({files.lock})"
    return summary_line(run.label, records[0], files.record)


def _start_worker(devices: str | None, cores: list[int]) -> None:
    """Pool worker initializer: its slot, a CUDA_VISIBLE_DEVICES value (if there are GPUs) and a share of the CPU
    cores (which sizes the run's data loaders; a run sets its own CPU threads, as its identity says)."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def _death_record(spec: Any, settings: Settings, per_run: int) -> tuple[str, str]:
    """(where the run's record goes, the record to write there if its worker dies: status `error`, its message
    to come). Made in the worker before the run starts, from the run's identity alone."""
    from .harness import RunFiles, bind_once, placeholder_record
    from .registry import load_plugin_file
    from .spec import resolve

    for plugin in settings.plugins:
        load_plugin_file(plugin)
    run = resolve(dataclasses.replace(spec, processes=per_run))
    bind_once([run], settings.data_root, settings.download, World())
    files = RunFiles.of(settings.out, run)
    return str(files.record), placeholder_record(run, settings.command).to_json()


def _work(spec: Any, report: Any, settings: Settings, per_run: int) -> str:
    """One run in a pool worker: in this process, or on `per_run` ranks started by torchrun's launcher; it reports
    first what to record should the worker die."""
    report(_death_record(spec, settings, per_run))
    if per_run == 1:
        return run_one(spec, settings)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=per_run, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
                          run_id=f"qatbench-{os.getpid()}")
    try:
        return elastic_launch(config, run_one)(spec, settings)[0]
    except SignalException as err:  # the agent stopped its ranks (they checkpointed); not picklable as it is
        raise Stopped(int(err.sigval)) from None
    finally:
        for signum in STOP_SIGNALS:  # the agent installed its own handlers: idle again, ignore stops
            signal.signal(signum, signal.SIG_IGN)


def device_slots(device_type: str, workers: int, per_run: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each of `workers` workers: disjoint groups of `per_run` GPUs, dealt round
    robin (several workers per group when there are more workers than groups); none on the CPU."""
    if device_type != "cuda":
        return [None] * workers
    import torch

    count = torch.cuda.device_count()
    groups = [",".join(str(g) for g in range(i, i + per_run)) for i in range(0, count - per_run + 1, per_run)]
    if not groups:
        raise QatbenchError(f"--gpus-per-run {per_run} but only {count} GPUs are visible")
    return [groups[i % len(groups)] for i in range(workers)]


def core_shares(workers: int) -> list[list[int]]:
    """Each of `workers` workers' CPU cores: contiguous, disjoint shares of this process's cores (shared
    round robin when there are more workers than cores); none where the platform cannot pin processes."""
    if not hasattr(os, "sched_getaffinity"):
        return [[] for _ in range(workers)]
    cores = sorted(os.sched_getaffinity(0))
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    return [cores[i * len(cores) // workers:(i + 1) * len(cores) // workers] for i in range(workers)]


def run_local(specs: list[Any], settings: Settings, workers: int, per_run: int, log: Any = print) -> list[str]:
    """Every run of `specs` on a pool of `workers` processes (each pinned to its devices and cores); the summary
    lines (`qatbench.pool`).

    A stop signal sent to this process alone (`kill PID`, a scheduler's SIGTERM) is passed on to the workers:
    their runs checkpoint at their next step and record `interrupted`, the runs not yet started are dropped, and
    `Stopped` is raised once every started run has returned. A worker that dies (killed by the OOM killer, say)
    costs only its run, which is recorded `error` with how the worker died; the others go on, and the next sweep
    resumes it from its last checkpoint. Killing this process (even with SIGKILL) ends the workers too."""
    if workers < 1 or per_run < 1:
        raise QatbenchError(f"--workers {workers} and --gpus-per-run {per_run} must be >= 1")
    device_type = "cuda" if specs and specs[0].device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        specs = [dataclasses.replace(s, device="cuda") for s in specs]  # each worker sees only its own GPUs
    slots = list(zip(device_slots(device_type, workers, per_run), core_shares(workers)))
    lines: list[str] = []

    def ended(outcome: Outcome) -> None:
        if isinstance(outcome.error, Stopped):  # its record says `interrupted`
            log(f"a run was {outcome.error}")
            return
        if outcome.died is not None:
            line = _record_death(outcome)
        elif outcome.error is not None:
            line = f"a run failed before training: {outcome.error}"
        else:
            line = outcome.result
        lines.append(line)
        log(line)

    with stop_signals() as stop:
        run_tasks(functools.partial(_work, settings=settings, per_run=per_run), specs, workers, ended,
                  lambda: stop.signum, _start_worker, slots, forward=signal.SIGTERM if per_run > 1 else None)
    if stop:
        raise Stopped(stop.signum)
    return lines


def _record_death(outcome: Outcome) -> str:
    """Record the run of a worker that died (unless it finished first); its summary line."""
    from .harness import finished_record
    from .results import RunRecord, write_record

    code = outcome.died
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    why = " (the kernel's OOM killer sends SIGKILL when memory runs out)" if code == -signal.SIGKILL else ""
    message = (f"its worker process died ({how}{why}) before the run ended; the next sweep resumes it from its "
               "last checkpoint")
    if outcome.started is None:
        return f"a run's worker died before the run started: {how}"
    path, placeholder = Path(outcome.started[0]), RunRecord.from_dict(json.loads(outcome.started[1]))
    if finished_record(path) is None:
        placeholder.status, placeholder.message = "error", message
        write_record(path, placeholder)
    return f"[{placeholder.task} {placeholder.method} s{placeholder.seed}] error: {message} -> {path}"


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise QatbenchError("sweeps on SLURM need submitit: pip install 'qatbench[cluster]'") from None
    return submitit


class RunJob:
    """A submitit job: one run, checkpointable (a requeued job resumes from the run's checkpoint)."""

    def __init__(self, settings: Settings, per_run: int) -> None:
        self.settings, self.per_run = settings, per_run

    def __call__(self, spec: Any) -> str:
        submitit = _submitit()
        if self.per_run > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() and requeue
        try:
            return run_one(spec, self.settings, (*STOP_SIGNALS, signal.SIGUSR2))
        except Stopped as stopped:
            if stopped.signum == signal.SIGUSR2 and callable(requeue):
                requeue(stopped.signum, None)  # the run's checkpoint is written: now let submitit requeue
            raise

    def checkpoint(self, spec: Any) -> Any:
        """What submitit resubmits on preemption: the same run, which resumes from its checkpoint."""
        return _submitit().helpers.DelayedSubmission(RunJob(self.settings, self.per_run), spec)


def submit(specs: list[Any], settings: Settings, cluster: str, per_run: int, parameters: dict[str, Any],
           log: Any = print) -> list[str]:
    """Submit one job per run with submitit (`cluster` slurm or debug); the job ids. The debug executor runs
    the jobs here, one after the other."""
    submitit = _submitit()
    try:
        executor = submitit.AutoExecutor(folder=settings.out / ".submitit" / "%j", cluster=cluster)
    except RuntimeError as err:  # e.g. no srun here: not a SLURM machine
        raise QatbenchError(f"--executor {cluster}: {err}") from None
    executor.update_parameters(name="qatbench", gpus_per_node=per_run if specs[0].device.startswith("cuda") else 0,
                               tasks_per_node=per_run, slurm_signal_delay_s=SLURM_SIGNAL_DELAY_S, **parameters)
    jobs = executor.map_array(RunJob(settings, per_run), specs)
    for job, spec in zip(jobs, specs):
        log(f"job {job.job_id}: {spec.task} {spec.method} b{spec.bits} s{spec.seed}")
        if cluster == "debug":
            log(job.result())
    return [job.job_id for job in jobs]
