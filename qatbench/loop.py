"""The training loop of one run, which can stop anywhere and resume exactly.

`train_run` reads top to bottom: load the data, build the model, its loss and optimizer and the
method, resume from the run's checkpoint if there is one, then for each epoch: each batch's step
(`qatbench.step.train_step`: forward, backward, `method.step(closure)`), the LR schedule, a
checkpoint every `checkpoint_minutes` and on a stop signal; at the epoch's end an evaluation, the
history, a checkpoint; then `finish` (finalize, exactness check, final evaluation, export).

A checkpoint holds the training state (the model, the method, the transition monitor; under FSDP
each rank's shards of them), the LR schedule, the data's place inside the epoch, every random
generator, each rank's partial loss sum, the record so far and the timing (`qatbench.checkpoint`).
A checkpoint that does not fit the rebuilt run (crafted, or of an older qatbench) is refused and
the run starts over. On several ranks every rank trains its part of each global batch, they agree
every SYNC_STEPS steps on stopping and checkpointing, and rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .clock import TIMING_WARMUP_STEPS, SteadyClock, waited_on
from .diagnostics import TransitionMonitor
from .distributed import World, all_reduce, gather, gather_to_main, reduce_tensor_
from .errors import QatbenchError
from .finish import finish
from .progress import Progress, StepLog
from .results import RunRecord
from .sharding import load_local_state, local_state, restore_optimizer_shards, whole_weights
from .signals import StopRequest, Stopped
from .spec import ResolvedRun
from .step import Training, build_training, seed_everything, train_step
from .system import PeakMemory, training_state_bytes
from .task import check_batches

Log = Callable[[str], None]
DATA_WAIT_WARNING = 0.1  # share of an epoch's training time spent waiting on the loader that is warned about
DATA_WAIT_WARNING_MIN_S = 0.5  # ... when the wait is at least this long (not a tiny epoch's first batch)
SYNC_STEPS = 20  # on several ranks, how often they agree on stopping and checkpointing (one small all-reduce)


@dataclasses.dataclass
class Position:
    """Where training stands: `step_in_epoch == steps_per_epoch` means the epoch is trained, its evaluation pending."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps since the start of training


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a run's files go and how it reports: its checkpoint and export (None: nothing is written), its
    per-step logs beside `record_file`, its lines, its place among the processes that train it."""

    checkpoint: Path | None
    export: Path | None
    record_file: Path | None
    checkpoint_minutes: float
    logs: tuple[str, ...]
    progress_seconds: float
    log: Log
    world: World


def training_state(training: Training, monitor: TransitionMonitor) -> dict[str, Any]:
    """The model's, the method's and the transition monitor's state: the same on every rank, except under FSDP,
    where each rank holds its shards of it."""
    return {"model": training.model.state_dict(), "method": training.method.state_dict(),
            "monitor": monitor.state_dict()}


def rank_state(generators: dict[str, torch.Generator], loss_sum: torch.Tensor,
               shards: dict[str, Any] | None) -> dict[str, Any]:
    """What differs between the ranks of a run: their random generators' states, their epoch's loss sum, and
    under FSDP their shards of the training state."""
    own = {"random": checkpoint.random_states(generators), "loss_sum": loss_sum.detach().cpu()}
    return own if shards is None else {**own, "shards": local_state(shards)}


def checkpoint_payload(run: ResolvedRun, training: Training, monitor: TransitionMonitor, batches: Any,
                       ranks: list[dict[str, Any]], position: Position, timing: dict[str, Any],
                       progress: dict[str, Any]) -> dict[str, Any]:
    """Everything a checkpoint holds (see `qatbench.checkpoint`): the state the ranks share (identical on
    every rank; under FSDP in each rank's part instead), each rank's own `rank_state`, and `progress`, the
    record so far."""
    shared = dict.fromkeys(("model", "method", "monitor")) if run.spec.fsdp else training_state(training, monitor)
    return {"run_id": run.run_id, "identity": run.identity, "label": run.label, "epochs": run.recipe.epochs,
            "steps_per_epoch": training.steps_per_epoch, "position": dataclasses.asdict(position), **shared,
            "scheduler": training.scheduler.state_dict(), "batches": batches.state_dict(), "ranks": ranks,
            "timing": timing, "record": progress}


def agree(signum: int | None, due: bool) -> tuple[int, bool]:
    """What every rank does now: stop (with the first rank's signal) and checkpoint, if any rank says so."""
    stop_signum, checkpoint_due = all_reduce([float(signum or 0), float(due)], "max")
    return int(stop_signum), bool(checkpoint_due)


class RunTraining:
    """One run while it trains: its data, its training (model, loss, method, schedule), the transition monitor,
    where it stands, its clock, and the record it fills."""

    def __init__(self, run: ResolvedRun, record: RunRecord, where: Where, stop: StopRequest) -> None:
        self.run, self.record, self.where, self.stop = run, record, where, stop
        self.world = where.world
        seed_everything(run.spec.seed)
        self.generators = {"data": torch.Generator(run.device).manual_seed(run.spec.seed),
                           "method": torch.Generator(run.device).manual_seed(run.spec.seed + 1)}
        self.data = run.task.load_data(run.data, run.device, run.recipe.batch_size, self.generators["data"])
        check_batches(run.task.name, self.data)
        record.num_train, record.num_test = self.data.num_train, self.data.num_test
        self._shard_data()
        self.memory = PeakMemory(run.device)
        self.memory.start()  # the data is resident: the peak from here on is training's
        self.steps_per_epoch = min(len(self.data.train), run.recipe.epoch_steps or len(self.data.train))
        if self.steps_per_epoch == 0:
            raise QatbenchError(f"batch size {run.recipe.batch_size} exceeds the {self.data.num_train} training "
                                "examples")
        self._fresh()
        saved = self._resume()
        self.clock = SteadyClock(run.device, min(TIMING_WARMUP_STEPS, self.training.total_steps // 2),
                                 saved["timing"] if saved is not None else None)
        self.last_checkpoint = time.monotonic()
        self.progress = Progress(run.label, self.training.total_steps,
                                 where.progress_seconds if self.world.main else 0, where.log)
        self.step_log = StepLog(where.logs, where.record_file) \
            if where.logs and where.record_file is not None and self.world.main else None

    def _shard_data(self) -> None:
        """On several ranks, each iterates its part of every global batch."""
        if not self.world.distributed:
            return
        batch = self.run.recipe.batch_size
        if batch % self.world.size:
            raise QatbenchError(f"the global batch of {batch} does not divide over {self.world.size} processes")
        for batches in (self.data.train, self.data.test):
            if not hasattr(batches, "shard"):
                raise QatbenchError(f"task {self.run.task.name!r}: its batches cannot be split over ranks "
                                    "(no shard())")
            batches.shard(self.world.rank, self.world.size)

    def _fresh(self) -> None:
        """The training as it starts: a model from the seed, the method, the monitor, position 0."""
        self.training = build_training(self.run, self.steps_per_epoch, self.generators["method"], self.world)
        self.monitor = TransitionMonitor(self.training.method)
        self.position = Position()
        self.loss_sum = torch.zeros((), device=self.run.device)

    # -- resume ---------------------------------------------------------------------------------------
    def _resume(self) -> dict[str, Any] | None:
        """Continue from the run's checkpoint, if there is one that fits; else start over (saying why)."""
        path, log, label = self.where.checkpoint, self.where.log, self.run.label
        if path is None or not path.exists():
            return None
        try:
            saved = checkpoint.load(path, self.run.run_id, mmap=self.run.spec.fsdp)
        except checkpoint.Unusable as err:
            log(f"[{label}] warning: ignoring the checkpoint: {err}; starting over")
            return None
        try:
            self._load(saved)
            problem = None
        except QatbenchError:
            raise
        except Exception as err:  # a checkpoint that does not fit (crafted, or of an older qatbench)
            problem = f"{type(err).__name__}: {err}"
        if all_reduce([float(problem is not None)], "max")[0]:
            log(f"[{label}] warning: the checkpoint {path} does not fit this run ({problem or 'on another rank'}); "
                "starting over")
            seed_everything(self.run.spec.seed)
            for name, generator in self.generators.items():
                generator.manual_seed(self.run.spec.seed + (name == "method"))
            self._fresh()
            return None
        log(f"[{label}] resumed from {path} at step {self.position.step} (epoch {self.position.epoch + 1}, resume "
            f"{len(self.record.resumed)})")
        return saved

    def _load(self, saved: dict[str, Any]) -> None:
        """Load a checkpoint into the freshly built training: the model (under FSDP this rank's shards), the method,
        the monitor, the LR schedule, the generators, the data's place inside the epoch, and (last, once everything
        else has loaded) the record so far. Raises when the checkpoint does not fit."""
        run, training, world = self.run, self.training, self.world
        if len(saved["ranks"]) != world.size or ("shards" in saved["ranks"][0]) != run.spec.fsdp:
            sharded = " sharded (--fsdp)" if "shards" in saved["ranks"][0] else ""
            raise QatbenchError(f"the checkpoint was written by {len(saved['ranks'])}{sharded} processes; resume "
                                f"it the same way (this is {world.size}{' sharded' if run.spec.fsdp else ''})")
        if run.spec.fsdp:  # each rank's shards of the model, the method and the monitor
            state = saved["ranks"][world.rank]["shards"]
            load_local_state(training.model, state["model"])
            training.method.load_state_dict(state["method"])
            restore_optimizer_shards(training.method.optimizer)
        else:
            state = saved
            training.model.load_state_dict(state["model"])
            training.method.load_state_dict(state["method"])
        self.monitor.load_state_dict(state["monitor"])
        training.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_random_states(saved["ranks"][world.rank]["random"], self.generators)
        loss_sum = saved["ranks"][world.rank]["loss_sum"].to(run.device)
        position = Position(**saved["position"])
        if not 0 <= position.step_in_epoch <= self.steps_per_epoch or not 0 <= position.epoch <= run.recipe.epochs:
            raise ValueError(f"position {saved['position']} is outside this run's {run.recipe.epochs} epochs of "
                             f"{self.steps_per_epoch} steps")
        if 0 < position.step_in_epoch < self.steps_per_epoch:  # stopped inside an epoch: continue it
            self.data.train.load_state_dict(saved["batches"])
        so_far = {key: saved["record"][key] for key in ("history", "best_epoch_metric", "epochs_completed", "resumed")}
        RunRecord.from_dict(json.loads(dataclasses.replace(self.record, **so_far).to_json()))  # a valid record
        for key, value in so_far.items():
            setattr(self.record, key, value)
        self.record.resumed.append({"step": position.step, "epoch": position.epoch,
                                    "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        self.position, self.loss_sum = position, loss_sum

    # -- checkpoints ----------------------------------------------------------------------------------
    def write_checkpoint(self) -> None:
        """Every rank gives its part (its generators, its loss sum, under FSDP its shards); rank 0 writes."""
        self.last_checkpoint = time.monotonic()
        if self.where.checkpoint is None:
            return
        shards = training_state(self.training, self.monitor) if self.run.spec.fsdp else None
        ranks = gather_to_main(rank_state(self.generators, self.loss_sum, shards))
        if not self.world.main:
            return
        record = self.record
        so_far = {"history": record.history, "best_epoch_metric": record.best_epoch_metric,
                  "epochs_completed": record.epochs_completed, "resumed": record.resumed}
        payload = checkpoint_payload(self.run, self.training, self.monitor, self.data.train, ranks, self.position,
                                     self.clock.snapshot(), so_far)
        seconds, size = checkpoint.save(self.where.checkpoint, payload)
        self.clock.add("checkpoint_s", seconds)
        self.clock.totals["checkpoints"] += 1
        self.clock.totals["checkpoint_bytes"] = size

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> None:
        """Every epoch left, then the timing and memory in the record, then `finish` (unless it diverged)."""
        try:
            for epoch in range(self.position.epoch, self.run.recipe.epochs):
                self.train_epoch(epoch)
                if not self.end_epoch(epoch):
                    break
        finally:
            if self.step_log is not None:
                self.step_log.close(self.training.method.diagnostics())
        self.record.timing = self.timing()
        model, method = self.training.model, self.training.method
        memory = _max_over_ranks(gather(self.memory.read()))
        self.record.memory = {**memory, "state_bytes": training_state_bytes(model, method)}
        if self.record.status == "diverged":
            return
        finish(self.run, self.record, model, method, self.data.train, self.data.test,
               self.where.export if self.world.main else None)

    def train_epoch(self, epoch: int) -> None:
        """The epoch's remaining steps (none when it was trained before a stop at its end)."""
        remaining = self.steps_per_epoch - self.position.step_in_epoch
        if remaining <= 0:
            return
        train, clock = self.data.train, self.clock
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        self.training.model.train()
        self.progress.begin_epoch(epoch, self.run.recipe.epochs, self.steps_per_epoch, self.position.step_in_epoch)
        clock.begin()
        epoch_start, wait_start = time.perf_counter(), clock.totals["data_wait_s"]
        for inputs, targets in waited_on(itertools.islice(train, remaining), train, clock):
            loss = train_step(self.training, inputs, targets, self.run.recipe.grad_clip)
            self.after_step(epoch, loss)
        clock.end()
        self.progress.end_epoch()
        self._warn_about_data_wait(epoch, clock.totals["data_wait_s"] - wait_start, epoch_start)

    def after_step(self, epoch: int, loss: torch.Tensor) -> None:
        """A step's bookkeeping; every SYNC_STEPS on several ranks (every step on one), a checkpoint when due or
        asked for by a stop signal, after which the run stops."""
        training, position = self.training, self.position
        self.memory.settle()  # after this process's first step: the level a step's transients rise from
        self.monitor.after_step()
        if self.step_log is not None:
            self.step_log.record(position.step + 1, epoch, loss, training.scheduler.get_last_lr()[0],
                                 training.method.diagnostics)
        training.scheduler.step()
        self.loss_sum += loss.detach()
        position.step_in_epoch += 1
        position.step += 1
        self.clock.step_done()
        self.progress.step(position.step, loss)
        if position.step % (SYNC_STEPS if self.world.distributed else 1):
            return
        due = time.monotonic() - self.last_checkpoint >= 60 * self.where.checkpoint_minutes
        signum, due = agree(self.stop.signum, due)
        if signum or (due and position.step_in_epoch < self.steps_per_epoch):
            self.write_checkpoint()
            if signum:
                raise Stopped(signum, position.step)

    def end_epoch(self, epoch: int) -> bool:
        """Evaluate, add the epoch to the history, checkpoint; False when the loss diverged (the run ends)."""
        run, record, training = self.run, self.record, self.training
        task = run.task
        mean_loss = reduce_tensor_(self.loss_sum.clone(), "avg").item() / self.steps_per_epoch
        start = time.perf_counter()
        with whole_weights(training.model):
            metric = task.evaluate(training.model, self.data.test) if math.isfinite(mean_loss) else float("nan")
        self.clock.add("eval_s", time.perf_counter() - start)
        record.epochs_completed = epoch + 1
        record.history.append({"epoch": epoch + 1, "train_loss": mean_loss, task.metric: metric,
                               "lr": training.scheduler.get_last_lr()[0], **training.method.diagnostics(),
                               **self.monitor.epoch_summary()})
        if self.step_log is not None:
            self.step_log.epoch(self.position.step, record.history[-1])
        self.where.log(f"[{run.label}] epoch {epoch + 1}/{run.recipe.epochs} loss {mean_loss:.4f} {task.metric} "
                       f"{metric:.2f} ({self.clock.snapshot()['wall_s']:.1f}s)")
        if not math.isfinite(mean_loss):
            record.status, record.message = "diverged", f"non-finite training loss in epoch {epoch + 1}"
            return False
        metrics = [h[task.metric] for h in record.history]
        record.best_epoch_metric = max(metrics) if task.higher_is_better else min(metrics)
        self.position = Position(epoch + 1, 0, self.position.step)
        self.loss_sum = torch.zeros((), device=run.device)
        self.write_checkpoint()  # after the last epoch too: a run killed while finishing resumes here
        signum, _ = agree(self.stop.signum, False)
        if signum:
            raise Stopped(signum, self.position.step)
        return True

    def _warn_about_data_wait(self, epoch: int, waited_s: float, epoch_start: float) -> None:
        share = waited_s / max(1e-9, time.perf_counter() - epoch_start)
        if share > DATA_WAIT_WARNING and waited_s >= DATA_WAIT_WARNING_MIN_S and self.world.main:
            self.where.log(f"[{self.run.label}] warning: training waited on its data loader {100 * share:.0f}% of "
                           f"epoch {epoch + 1}'s time: more loader workers (--task-arg workers=N), faster storage, "
                           "or a larger /dev/shm would speed it up")

    def timing(self) -> dict[str, Any]:
        """What the record says about time (see the README's Speed section)."""
        clock, recipe, task = self.clock, self.run.recipe, self.run.task
        timing = clock.snapshot()
        timing["warmup_steps"] = clock.warmup
        timing["steady_step_ms"] = 1000 * timing["steady_train_s"] / max(1, timing["steady_steps"])
        if timing["steady_train_s"] > 0:
            timing["samples_per_s"] = timing["steady_steps"] * recipe.batch_size / timing["steady_train_s"]
            if task.tokens_per_sample():
                timing["tokens_per_s"] = timing["samples_per_s"] * task.tokens_per_sample()
        timing["train_s"] = timing.pop("wall_s") - timing["eval_s"]  # over every resume, checkpoints included
        timing["earlier_processes_s"] = clock.wall_before  # the run's time before this process resumed it
        timing["data_wait_share"] = timing["data_wait_s"] / max(1e-9, timing["train_s"] - timing["checkpoint_s"])
        return timing


def _max_over_ranks(readings: list[dict[str, Any]]) -> dict[str, Any]:
    """One memory reading from every rank's: the largest number of each field (peaks are per process)."""
    merged = dict(readings[0])
    for reading in readings[1:]:
        for key, value in reading.items():
            if isinstance(value, (int, float)) and isinstance(merged.get(key), (int, float)):
                merged[key] = max(merged[key], value)
    return merged


def train_run(run: ResolvedRun, record: RunRecord, where: Where, stop: StopRequest) -> None:
    """Train `run` (resuming from its checkpoint when there is one), finalize, check exactness, evaluate and export,
    filling `record` as it goes."""
    RunTraining(run, record, where, stop).train()
