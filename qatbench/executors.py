"""Many runs at once: a sweep on this machine's devices (a process pool) or on a SLURM cluster (submitit).

The unit of work is one run (`run_one`): it resolves the run, keeps its output (every line,
warnings and library messages included) in `<record>.log` beside its record, and goes
through `run_all` like any run: locked (so overlapping sweeps never train a run twice),
checkpointed, resumed. A run that needs several processes (`--gpus-per-run G > 1`) is
started by torchrun's own launcher (`torch.distributed.launcher`), one rank per device.

- `local`: the standard library's process pool with K workers; each worker is pinned to
  its own GPU (or group of G GPUs) when there are several, or several workers share one
  (`--workers` above the number of GPUs: two runs share one H100 at about 1.9x the
  throughput of one).
- `slurm`: one submitit job-array task per run (`map_array`), G tasks per job for a DDP run
  (submitit's `TorchDistributedEnvironment` sets the ranks). A preempted or timed-out job
  gets SIGUSR2 from SLURM (`--signal=USR2@120`): the run checkpoints at its next step,
  records `interrupted`, and submitit requeues it; the requeued job resumes from the
  checkpoint.
- `debug`: submitit's debug executor: the same jobs, run one after the other in this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import open_append
from .errors import QatbenchError
from .options import Settings
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


class _PoolWorker:
    """What a pool worker process holds from its start: the sweep's stop flag, set by the pool's owner."""

    stopping: Any = None  # a multiprocessing Event


def _start_worker(slots: Any, stopping: Any) -> None:
    """Pool worker initializer: take a slot (a CUDA_VISIBLE_DEVICES value, if there are GPUs, and a share of
    the CPU cores, which sizes the run's data loaders and threads) and keep the sweep's stop flag. Between
    runs the worker ignores stop signals (a run routes them to its checkpoint), so that a stop passed on by
    the pool's owner never kills an idle worker and breaks the pool."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _PoolWorker.stopping = stopping
    devices, cores = slots.get()
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
        if "torch" in sys.modules:  # imported with the spawned main module: its thread pool sized for every core
            sys.modules["torch"].set_num_threads(len(cores))


def _work(spec: Any, settings: Settings, per_run: int) -> str | None:
    """One run in a pool worker: in this process, or on `per_run` ranks started by torchrun's launcher; None
    when the sweep was stopped before the run could start."""
    if _PoolWorker.stopping is not None and _PoolWorker.stopping.is_set():
        return None
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
    """Every run of `specs` on a pool of `workers` processes (each pinned to its devices); the summary lines.

    A stop signal sent to this process alone (`kill PID`, a scheduler's SIGTERM) is passed on to the
    workers: their runs checkpoint at their next step and record `interrupted`, the runs not yet started
    are dropped, and `Stopped` is raised once every started run has returned."""
    if workers < 1 or per_run < 1:
        raise QatbenchError(f"--workers {workers} and --gpus-per-run {per_run} must be >= 1")
    device_type = "cuda" if specs and specs[0].device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        specs = [dataclasses.replace(s, device="cuda") for s in specs]  # each worker sees only its own GPUs
    context = multiprocessing.get_context("spawn")
    slots, stopping = context.Queue(), context.Event()
    for slot in zip(device_slots(device_type, workers, per_run), core_shares(workers)):
        slots.put(slot)
    lines: list[str] = []
    with stop_signals() as stop, concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(slots, stopping)) as pool:
        pending = {pool.submit(_work, spec, settings, per_run) for spec in specs}
        try:
            _collect(pending, lines, stop, stopping, per_run, log)
        except KeyboardInterrupt:  # Ctrl-C: the runs under way record `interrupted`, nothing more starts
            _drop_queued(pending, stopping)
            _signal_workers(signal.SIGTERM)  # where Ctrl-C reached only this process
            raise
    if stop:
        raise Stopped(stop.signum)
    return lines


def _collect(pending: set[Any], lines: list[str], stop: Any, stopping: Any, per_run: int, log: Any) -> None:
    """Wait for the pool's runs, logging each one's summary line (kept in `lines`); on a stop signal, pass it
    on to the workers and drop the runs not yet started."""
    forwarded = False
    while pending:
        done, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            error = None if future.cancelled() else future.exception()
            if future.cancelled() or (error is None and future.result() is None):
                continue
            if isinstance(error, Stopped):  # its record says `interrupted`
                log(f"a run was {error}")
                continue
            lines.append(future.result() if error is None else f"a run failed before training: {error}")
            log(lines[-1])
        if stop:
            if not forwarded:
                _drop_queued(pending, stopping)
            if not forwarded or per_run == 1:
                # passed on again every half second: a worker between taking a run and routing stop signals
                # to it ignores them, and a run ignores all but the first; torchrun's agents get it once
                # (as SIGTERM, which they pass on to their ranks)
                _signal_workers(stop.signum if per_run == 1 else signal.SIGTERM)
            forwarded = True


def _drop_queued(pending: set[Any], stopping: Any) -> None:
    """Start no more runs: those queued are cancelled, and one already handed to a worker returns unstarted."""
    stopping.set()
    for future in pending:
        future.cancel()


def _signal_workers(signum: int) -> None:
    """Send `signum` to the pool's workers (this process's only children)."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


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
