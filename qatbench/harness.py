"""The lifecycle of runs: lock, train (resuming), record, release; many runs, every finished one kept.

Run lifecycle: take the run's lock (skip the run if a live process holds it) -> train it
(`qatbench.loop`: resume from its checkpoint if one exists, checkpoint every epoch, every
`checkpoint_minutes` and on a stop signal, finalize, check exactness, evaluate, export) -> write
the record -> delete the checkpoint -> release the lock. A failure inside a run (a crash, a NaN
loss, an out-of-memory error, Ctrl-C, a stop signal) becomes its record's status; a user error
(a bad data path) is raised as a one-line error.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic import own_folder
from .distributed import World, broadcast, gather
from .errors import QatbenchError
from .locks import RunLock, read_lock, try_lock
from .loop import Where, train_run
from .options import Settings
from .results import FINISHED, RunRecord, read_record, record_path, write_record
from .signals import STOP_SIGNALS, StopRequest, Stopped, stop_signals
from .spec import ResolvedRun, bind_data
from .step import prepare_device
from .system import environment

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The files of one run, all beside its record and named after it."""

    record: Path

    @property
    def lock(self) -> Path:
        return self.record.with_suffix(".lock")

    @property
    def checkpoint(self) -> Path:
        return self.record.with_suffix(".ckpt")

    @property
    def export(self) -> Path:
        return self.record.with_suffix(".safetensors")

    @classmethod
    def of(cls, out: Path, run: ResolvedRun) -> RunFiles:
        """The files of `run` in the results folder `out`, in its task's folder (made, and checked not to be a
        link that would take them elsewhere)."""
        own_folder(out, run.task.name)
        return cls(record_path(out, run.task.name, run.method_cls.name, run.bits_text, run.spec.seed, run.run_id))


@dataclasses.dataclass(frozen=True)
class RunOptions(Settings):
    """How runs are executed (`Settings`), and what only the process that executes them has: where its lines
    go, its place among the processes that train each run together (torchrun), the signals that stop a run
    at its next step, checkpointed."""

    log: Log = print
    world: World = World()
    stop_signals: tuple[int, ...] = STOP_SIGNALS

    @classmethod
    def of(cls, settings: Settings, **runtime: Any) -> RunOptions:
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings)}, **runtime)


def placeholder_record(run: ResolvedRun, command: str | None) -> RunRecord:
    """What is known of a run before it starts, without touching its device (no CUDA context is made): its
    identity, where it runs, status `error` until it finishes."""
    return RunRecord(
        run_id=run.run_id, spec=run.identity, method=run.method_cls.name, task=run.task.name, bits=run.bits,
        seed=run.spec.seed, status="error", metric_name=run.task.metric, higher_is_better=run.task.higher_is_better,
        quantized=run.method_cls.quantizes, data=run.data_fingerprint.to_dict(),
        environment={"host": socket.gethostname(), "pid": os.getpid(), "device_type": run.device.type},
        command=command, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def new_record(run: ResolvedRun, command: str | None, world: World = World()) -> RunRecord:
    """The record of `run` before it trains (status `error` until it finishes); it says how many processes
    and which devices train it, and in how many micro-batches each process takes its part of a batch."""
    env = environment(run.device)
    per_process = run.recipe.batch_size // world.size
    micro = min(run.spec.micro_batch or per_process, per_process)
    env.update(world_size=world.size, devices=gather(env["device_name"]), fsdp=run.spec.fsdp, micro_batch=micro,
               accumulation_steps=math.ceil(per_process / max(1, micro)))
    return dataclasses.replace(placeholder_record(run, command), environment=env)


def execute(run: ResolvedRun, data_root: Path | None = None, download: bool = True, log: Log = print,
            command: str | None = None, files: RunFiles | None = None, options: RunOptions | None = None,
            stop: StopRequest | None = None) -> RunRecord:
    """One run. Training failures become a record status; user errors (a bad data path) raise.

    `files` says where the run's checkpoint and final weights go (without it nothing is written: the
    run neither resumes nor can be resumed); a stop request ends the run as `interrupted` once its
    checkpoint is written."""
    if run.data_fingerprint is None:
        bind_data([run], data_root, download)
    options = options or RunOptions(log=log, command=command)
    prepare_device(run)  # before the record notes the environment (its CPU threads)
    record = new_record(run, options.command, options.world)
    start = time.perf_counter()
    where = Where(files.checkpoint if files else None, files.export if files else None, files.record if files else None,
                  options.checkpoint_minutes, options.logs, options.progress_seconds, options.log, options.world)
    try:
        train_run(run, record, where, stop if stop is not None else StopRequest())
    except QatbenchError:
        raise
    except Stopped as err:
        record.status, record.message = "interrupted", str(err)
        record.timing["stopped_at_step"], record.timing["stopped_signal"] = err.step, err.signum
    except KeyboardInterrupt:
        record.status, record.message = "interrupted", "interrupted by the user (Ctrl-C)"
    except torch.OutOfMemoryError as err:
        record.status, record.message = "oom", str(err).splitlines()[0]
    except Exception as err:  # recorded, so that one broken run never stops a sweep
        record.status, record.message = "error", f"{type(err).__name__}: {err}"
    record.timing["total_s"] = time.perf_counter() - start + record.timing.get("earlier_processes_s", 0.0)
    return record


def finished_record(path: Path) -> RunRecord | None:
    """The finished record at `path`, or None (missing, unreadable, or not finished)."""
    try:
        existing = read_record(path)
    except (OSError, ValueError):
        return None
    return existing if existing.status in FINISHED else None


def bind_once(runs: list[ResolvedRun], data_root: Path | None, download: bool, world: World) -> None:
    """Locate and fingerprint the data of the runs that have none yet, on rank 0; every rank gets the result."""
    unbound = [r for r in runs if r.data_fingerprint is None]
    if world.main:
        bind_data(unbound, data_root, download)
    for run, (source, data_print) in zip(unbound, broadcast([(r.data, r.data_fingerprint) for r in unbound])):
        run.data, run.data_fingerprint = source, data_print


def _claim(run: ResolvedRun, files: RunFiles, options: RunOptions) -> tuple[RunLock | None, RunRecord | None]:
    """(the run's lock, None) when this process should train it; (None, its finished record) when it is done;
    (None, None) when another process holds it. Says why it skips."""
    existing = None if options.force else finished_record(files.record)
    if existing is not None:
        options.log(f"[{run.label}] skipped: record exists ({files.record}); --force reruns it")
        return None, existing
    lock = try_lock(files.lock)
    if lock is None:
        info = read_lock(files.lock)
        held = info.describe() if info else "held by another process"
        stale = (f"; no sign of life for {info.age_s / 3600:.1f} h: if its owner is gone, delete {files.lock}"
                 if info and info.age_s > options.stale_lock_s else "")
        options.log(f"[{run.label}] skipped: {held}{stale}")
        return None, None
    existing = None if options.force else finished_record(files.record)
    if existing is not None:  # another process finished it while we looked
        lock.release()
    return (None, existing) if existing is not None else (lock, None)


def run_all(runs: list[ResolvedRun], out_dir: Path | None = None, data_root: Path | None = None,
            download: bool = True, force: bool = False, log: Log = print, command: str | None = None,
            options: RunOptions | None = None) -> list[RunRecord]:
    """Run each run whose record is missing or unfinished and that no other process is running; write each
    record as soon as it exists. `options` says everything about how (its `out`, `data_root`, ...); without it,
    the other arguments do.

    Several processes may share one `out`: a run is trained by whoever takes its lock first. A Ctrl-C or a
    stop signal ends the sweep after the interrupted run's record (and checkpoint) is written; every record
    written before it stays. The stop signal is re-raised as `Stopped`, Ctrl-C as KeyboardInterrupt. On
    several ranks (torchrun), rank 0 locates the data, takes the locks and writes; every rank trains."""
    options = options or RunOptions(out=Path(out_dir or "runs"), data_root=data_root, download=download, force=force,
                                    log=log, command=command)
    world = options.world
    for run in runs:
        if run.spec.processes != world.size:
            raise QatbenchError(f"{run.label} is a run of {run.spec.processes} processes; this is {world.size}")
    bind_once(runs, options.data_root, options.download, world)
    records = []
    with stop_signals(options.stop_signals) as stop:
        for run in runs:
            files = RunFiles.of(options.out, run)
            lock, existing = _claim(run, files, options) if world.main else (None, None)
            train, existing = broadcast((lock is not None, existing))
            if not train:
                records += [existing] if existing is not None else []
                continue
            try:
                record = execute(run, files=files, options=options, stop=stop)
                if world.main:
                    write_record(files.record, record)
                    if record.status in FINISHED and not options.keep_checkpoints:
                        files.checkpoint.unlink(missing_ok=True)
            finally:
                if lock is not None:
                    lock.release()
            records.append(record)
            if world.main:
                options.log(summary_line(run.label, record, files.record))
            if record.status == "interrupted":
                if "stopped_at_step" in record.timing:
                    raise Stopped(record.timing["stopped_signal"], record.timing["stopped_at_step"])
                raise KeyboardInterrupt
    return records


def summary_line(label: str, record: RunRecord, path: Path) -> str:
    if record.status != "ok":
        return f"[{label}] {record.status}: {record.message} -> {path}"
    exact = {True: "exactly quantized", False: "NOT exactly quantized",
             None: "full precision"}[record.exactness["passed"]]
    return (f"[{label}] ok: {record.metric_name} {record.metric:.2f}, {exact}, "
            f"{record.timing['steady_step_ms']:.3f} ms/step -> {path}")
