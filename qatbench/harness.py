"""Runs one (method, task, bits, seed) and returns its RunRecord; runs many and keeps every finished one.

The training loop is one plain function (`_train`), readable top to bottom: data,
forward, loss, backward, `method.step(closure)`, LR schedule, checkpoint, per-epoch log
and evaluation; then `finalize()`, the exactness check and the final evaluation.

Run lifecycle: take the run's lock (skip the run if a live process holds
it) -> resume from the run's checkpoint if one exists -> train, writing an atomic
checkpoint every epoch, every `checkpoint_minutes` and on a stop signal -> finalize ->
exactness check -> evaluate -> write the record -> delete the checkpoint -> release
the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy
import torch

from . import checkpoint
from .diagnostics import TransitionMonitor
from .atomic import own_folder
from .distributed import World, all_reduce, broadcast, gather, gather_to_main, reduce_tensor_
from .errors import QatbenchError
from .export import check_fits, export_model, load_export
from .locks import RunLock, read_lock, try_lock
from .method import Method
from .options import Settings
from .quant import check_exact
from .results import FINISHED, RunRecord, read_record, record_path, write_record
from .progress import Progress, StepLog
from .sharding import (gradient_sync_paused, load_local_state, local_state, restore_optimizer_shards, shard_model,
                       whole_level_tables, whole_state_dict, whole_weights)
from .signals import STOP_SIGNALS, StopRequest, Stopped, stop_signals
from .spec import ResolvedRun, bind_data
from .system import PeakMemory, environment, training_state_bytes

Log = Callable[[str], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TIMING_WARMUP_STEPS = 10  # steps after each (re)start excluded from the steady-state step time (caches, compile)
DATA_WAIT_WARNING = 0.1  # share of an epoch's training time spent waiting on the loader that is warned about
DATA_WAIT_WARNING_MIN_S = 0.5  # ... when the wait is at least this long (not a tiny epoch's first batch)
SYNC_STEPS = 20  # on several ranks, how often they agree on stopping and checkpointing (one small all-reduce)


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


@dataclasses.dataclass
class Training:
    """Everything one run trains with; built the same way by a run and by `qatbench bench`."""

    model: torch.nn.Module
    compute_loss: LossFn  # the training forward (through DDP on several ranks, unless sharded with FSDP)
    method: Method
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total_steps: int
    probe_loss: LossFn  # a forward of the model itself, for probes under no_grad
    micro_batch: int | None = None  # samples per forward and backward (None: the whole batch)
    no_sync: Callable[[], Any] = contextlib.nullcontext  # DDP's or FSDP's: a backward that leaves the gradient unreduced


def _load_init(model: torch.nn.Module, path: str, task: str, device: torch.device) -> None:
    """Start from a checkpoint: another run's export (`.safetensors`, quantized ones dequantized) or a
    state dict saved with `torch.save` (read with `weights_only`)."""
    if path.endswith(".safetensors"):
        state = load_export(Path(path)).state_dict
    else:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # a damaged or foreign file fails in many ways
            raise QatbenchError(f"--init {path!r} is not a state dict ({type(err).__name__}: {err})") from None
    check_fits(model, state, f"--init {path!r} (task {task!r})")
    model.load_state_dict(state)


def loss_function(run: ResolvedRun, module: torch.nn.Module) -> LossFn:
    """The batch loss of `module` (the model, or its DDP wrapper) under the run's speed options: bf16
    autocast, torch.compile, channels-last inputs.

    The methods keep acting on the model's own parameters; a compiled model reads them on
    every call, so in-place updates between steps are seen."""
    spec = run.spec
    forward = module if spec.compile == "none" else torch.compile(module, mode=spec.compile)
    bf16 = run.precision == "bf16"

    def compute_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if spec.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
            return run.task.loss(forward(inputs), targets)

    return compute_loss


def prepare_device(run: ResolvedRun) -> None:
    """The settings of the run's identity that decide its float arithmetic, applied to this process (they are
    process-wide torch settings, so every run sets them all). On the CPU, the threads of torch's intra-op
    pool (`threads`): how a matrix product or a reduction is split over threads decides the order of its float
    sums. On CUDA, the run's device as the current one (so that pinned memory, streams and libraries' defaults
    use it) and its `tf32`: TF32 tensor-core matrix multiplies and convolutions for fp32 (10-bit mantissa
    products, fp32 accumulation) and cudnn.benchmark's autotuned convolution algorithms, or full fp32 and
    neither."""
    if run.device.type != "cuda":
        torch.set_num_threads(run.spec.threads)
        return
    if run.device.index is not None:
        torch.cuda.set_device(run.device)
    fast = bool(run.base_identity["tf32"])
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = fast


def build_training(run: ResolvedRun, steps_per_epoch: int, method_generator: torch.Generator,
                   world: World = World()) -> Training:
    """A fresh model (from `--init` when given), its loss, base optimizer, LR schedule and the method; on
    several ranks the training forward goes through DistributedDataParallel (the gradient is averaged over
    the ranks' parts of the global batch), while probes go through the model itself; with `--fsdp` the model
    is sharded (FSDP2) before the optimizer and the method see its parameters."""
    prepare_device(run)
    model = run.task.build_model().to(run.device)
    if run.spec.init:
        _load_init(model, run.spec.init, run.task.name, run.device)
    if run.spec.channels_last:  # before the optimizer and the method: it changes the weights' memory format
        model.to(memory_format=torch.channels_last)
    if run.spec.fsdp:
        quantized = [name for name, p in model.named_parameters() if run.task.is_quantized(name, p)]
        shard_model(model, run.task.shard_units(model), quantized, world, run.device)
    optimizer = run.recipe.make_optimizer(run.task.param_groups(model))
    total_steps = run.recipe.epochs * steps_per_epoch
    scheduler = run.recipe.make_scheduler(optimizer, steps_per_epoch)
    method = run.method_cls(run.method_config, optimizer, run.quantizer, total_steps, method_generator)
    probe_loss = loss_function(run, model)
    micro_batch = run.spec.micro_batch
    if not world.distributed:
        return Training(model, probe_loss, method, scheduler, steps_per_epoch, total_steps, probe_loss, micro_batch)
    if run.spec.fsdp:
        return Training(model, probe_loss, method, scheduler, steps_per_epoch, total_steps, probe_loss, micro_batch,
                        lambda: gradient_sync_paused(model))
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return Training(model, loss_function(run, ddp), method, scheduler, steps_per_epoch, total_steps, probe_loss,
                    micro_batch, ddp.no_sync)


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor,
                  size: int | None) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """The batch in parts of at most `size` samples, each with its share of the batch `n_i / n`: the batch's
    mean loss is `sum_i (n_i / n) * mean loss of part i`, so the parts' weighted gradients add up to the
    batch's gradient (for per-sample losses; BatchNorm normalises each part by its own statistics)."""
    if size is None or len(inputs) <= size:
        return [(inputs, targets, 1.0)]
    return [(x, y, len(x) / len(inputs)) for x, y in zip(inputs.split(size), targets.split(size))]


def train_step(training: Training, inputs: torch.Tensor, targets: torch.Tensor,
               grad_clip: float = 0.0) -> torch.Tensor:
    """One step: forward and backward at the model's current weights (accumulated over the batch's
    micro-batches, if any), optional gradient-norm clipping, then the method's step.

    The closure re-evaluates this batch's loss at whatever weights the method has set,
    forward only, over the same micro-batches (FOGZO's probes). Each probe sees the step's own
    randomness (the same dropout and stochastic-depth draws as the forwards that took the
    gradient, so that every probe and the gradient measure one function of the weights), leaves
    the model's buffers (BatchNorm's running statistics) as the training forward left them, and on
    several ranks returns the loss of the whole global batch (the ranks' losses averaged)."""
    method, model = training.method, training.model
    probing = method.extra_forward_passes() > 0
    rng_before = _rng_snapshot(inputs.device) if probing else None
    parts = micro_batches(inputs, targets, training.micro_batch)
    if len(parts) == 1:
        loss = training.compute_loss(inputs, targets)
        loss.backward()
    else:
        loss = torch.zeros((), device=inputs.device)
        for index, (part_inputs, part_targets, share) in enumerate(parts):
            with training.no_sync() if index < len(parts) - 1 else contextlib.nullcontext():
                part_loss = share * training.compute_loss(part_inputs, part_targets)
                part_loss.backward()  # the gradient is reduced over the ranks with the last part's backward
            loss += part_loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    closure = None
    if probing:
        rng_after = _rng_snapshot(inputs.device)
        buffers = list(model.buffers())
        kept = [b.clone() for b in buffers]

        def closure() -> torch.Tensor:
            _rng_restore(rng_before)
            with torch.no_grad():
                probe = sum(share * training.probe_loss(x, y).float() for x, y, share in parts)
                probe = reduce_tensor_(probe, "avg")
            if buffers:
                torch._foreach_copy_(buffers, kept)
            _rng_restore(rng_after)
            return probe

    method.step(closure)
    method.zero_grad()
    return loss


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global generators a forward pass draws from (dropout, stochastic depth): CPU and the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _rng_restore(snapshot: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _seed_everything(seed: int) -> None:
    """Seed torch, and the global RNGs some libraries draw from (timm's mixup uses numpy's)."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SteadyClock:
    """Steady-state training time: every stretch of training (an epoch, or its part after a resume)
    after the first `warmup` steps of the process, without the time spent writing checkpoints; the
    device is synchronised at the edges of each measured stretch."""

    def __init__(self, device: torch.device, warmup: int, saved: dict[str, Any] | None = None) -> None:
        self.device, self.warmup = device, warmup
        self.totals = {"steady_train_s": 0.0, "steady_steps": 0, "eval_s": 0.0, "checkpoint_s": 0.0,
                       "checkpoints": 0, "data_wait_s": 0.0, **(saved or {})}
        self.wall_before = self.totals.pop("wall_s", 0.0)  # the run's time in the processes before this one
        self.process_start = time.perf_counter()
        self.steps_here = 0
        self.stretch_start: float | None = None
        self.stretch_steps = 0
        self.paused = 0.0

    def begin(self) -> None:
        if self.steps_here >= self.warmup:
            _sync(self.device)
            self.stretch_start, self.stretch_steps, self.paused = time.perf_counter(), 0, 0.0

    def step_done(self) -> None:
        self.steps_here += 1
        if self.stretch_start is not None:
            self.stretch_steps += 1
        elif self.steps_here == self.warmup:
            _sync(self.device)
            self.totals.setdefault("warmup_s", time.perf_counter() - self.process_start)
            self.stretch_start, self.stretch_steps, self.paused = time.perf_counter(), 0, 0.0

    def end(self) -> None:
        _sync(self.device)
        if self.stretch_start is not None:
            self.totals["steady_train_s"] += time.perf_counter() - self.stretch_start - self.paused
            self.totals["steady_steps"] += self.stretch_steps
        self.stretch_start = None

    def snapshot(self) -> dict[str, Any]:
        """The totals so far, with `wall_s`, the run's time since it first started, over every resume."""
        return {**self.totals, "wall_s": self.wall_before + time.perf_counter() - self.process_start}

    def add(self, key: str, seconds: float) -> None:
        """Time spent outside training (evaluation, checkpoints); it is not training time."""
        self.totals[key] = self.totals.get(key, 0.0) + seconds
        if self.stretch_start is not None:
            self.paused += seconds


def waited_on(batches: Iterable[Any], loader: Any, clock: SteadyClock) -> Iterator[Any]:
    """The items of `batches` (drawn from `loader`), with the time the loader made each one wait for its
    worker processes (its `waited_s`, where it keeps one) added to the clock's `data_wait_s`."""
    if not hasattr(loader, "waited_s"):  # data on the device: nothing to wait for
        yield from batches
        return
    counted = loader.waited_s
    for item in batches:
        clock.totals["data_wait_s"] += loader.waited_s - counted
        counted = loader.waited_s
        yield item


@dataclasses.dataclass
class Position:
    """Where training stands: `step_in_epoch == steps_per_epoch` means the epoch is trained, its evaluation pending."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps since the start of training


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


def _agree(signum: int | None, due: bool) -> tuple[int, bool]:
    """What every rank does now: stop (with the first rank's signal) and checkpoint, if any rank says so."""
    stop_signum, checkpoint_due = all_reduce([float(signum or 0), float(due)], "max")
    return int(stop_signum), bool(checkpoint_due)


def _resume(saved: dict[str, Any], run: ResolvedRun, training: Training, monitor: TransitionMonitor, batches: Any,
            generators: dict[str, torch.Generator], record: RunRecord, world: World) -> tuple[Position, torch.Tensor]:
    """Load a checkpoint into a freshly built training: the model (under FSDP this rank's shards), the method, the
    monitor, the LR schedule, the generators, the data's place inside the epoch, and (last, once everything else
    has loaded) the record so far. Raises when the checkpoint does not fit; the caller then starts over."""
    if len(saved["ranks"]) != world.size or ("shards" in saved["ranks"][0]) != run.spec.fsdp:
        sharded = " sharded (--fsdp)" if "shards" in saved["ranks"][0] else ""
        raise QatbenchError(f"the checkpoint was written by {len(saved['ranks'])}{sharded} processes; resume it "
                            f"the same way (this is {world.size}{' sharded' if run.spec.fsdp else ''})")
    if run.spec.fsdp:  # each rank's shards of the model, the method and the monitor
        state = saved["ranks"][world.rank]["shards"]
        load_local_state(training.model, state["model"])
        training.method.load_state_dict(state["method"])
        restore_optimizer_shards(training.method.optimizer)
    else:
        state = saved
        training.model.load_state_dict(state["model"])
        training.method.load_state_dict(state["method"])
    monitor.load_state_dict(state["monitor"])
    training.scheduler.load_state_dict(saved["scheduler"])
    checkpoint.set_random_states(saved["ranks"][world.rank]["random"], generators)
    loss_sum = saved["ranks"][world.rank]["loss_sum"].to(run.device)
    position = Position(**saved["position"])
    if not 0 <= position.step_in_epoch <= training.steps_per_epoch or not 0 <= position.epoch <= run.recipe.epochs:
        raise ValueError(f"position {saved['position']} is outside this run's {run.recipe.epochs} epochs of "
                         f"{training.steps_per_epoch} steps")
    if 0 < position.step_in_epoch < training.steps_per_epoch:  # stopped inside an epoch: continue it
        batches.load_state_dict(saved["batches"])
    so_far = {key: saved["record"][key] for key in ("history", "best_epoch_metric", "epochs_completed", "resumed")}
    probe = dataclasses.replace(record, **so_far)
    RunRecord.from_dict(json.loads(probe.to_json()))  # the record so far is a valid record
    for key, value in so_far.items():
        setattr(record, key, value)
    record.resumed.append({"step": position.step, "epoch": position.epoch,
                           "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return position, loss_sum


def _train(run: ResolvedRun, record: RunRecord, files: RunFiles | None, options: RunOptions,
           stop: StopRequest) -> None:
    """Train (resuming from the run's checkpoint when there is one), finalize, check exactness and
    evaluate, filling `record` as it goes. Without `files`, nothing is written to disk. On several ranks every
    rank trains its part of each global batch; rank 0 alone writes files."""
    device, recipe, task, log, world = run.device, run.recipe, run.task, options.log, options.world
    _seed_everything(run.spec.seed)
    generators = {"data": torch.Generator(device).manual_seed(run.spec.seed),
                  "method": torch.Generator(device).manual_seed(run.spec.seed + 1)}
    data = task.load_data(run.data, device, recipe.batch_size, generators["data"])
    record.num_train, record.num_test = data.num_train, data.num_test
    if world.distributed:
        if recipe.batch_size % world.size:
            raise QatbenchError(f"the global batch of {recipe.batch_size} does not divide over {world.size} processes")
        for batches in (data.train, data.test):
            if not hasattr(batches, "shard"):
                raise QatbenchError(f"task {task.name!r}: its batches cannot be split over ranks (no shard())")
            batches.shard(world.rank, world.size)
    memory = PeakMemory(device)
    memory.start()  # the data is resident: the peak from here on is training's

    steps_per_epoch = min(len(data.train), recipe.epoch_steps or len(data.train))
    if steps_per_epoch == 0:
        raise QatbenchError(f"batch size {recipe.batch_size} exceeds the {data.num_train} training examples")
    training = build_training(run, steps_per_epoch, generators["method"], world)
    sync_every = SYNC_STEPS if world.distributed else 1
    monitor = TransitionMonitor(training.method)
    position = Position()
    loss_sum = torch.zeros((), device=device)

    saved = None
    if files and files.checkpoint.exists():
        try:
            saved = checkpoint.load(files.checkpoint, run.run_id, mmap=run.spec.fsdp)
        except checkpoint.Unusable as err:
            log(f"[{run.label}] warning: ignoring the checkpoint: {err}; starting over")
    if saved is not None:
        try:
            position, loss_sum = _resume(saved, run, training, monitor, data.train, generators, record, world)
            problem = None
        except QatbenchError:
            raise
        except Exception as err:  # a checkpoint that does not fit (crafted, or of an older qatbench)
            problem = f"{type(err).__name__}: {err}"
        if all_reduce([float(problem is not None)], "max")[0]:
            log(f"[{run.label}] warning: the checkpoint {files.checkpoint} does not fit this run "
                f"({problem or 'on another rank'}); starting over")
            _seed_everything(run.spec.seed)
            for name, generator in generators.items():
                generator.manual_seed(run.spec.seed + (name == "method"))
            training = build_training(run, steps_per_epoch, generators["method"], world)
            monitor, position, loss_sum = TransitionMonitor(training.method), Position(), torch.zeros((), device=device)
            saved = None
        else:
            log(f"[{run.label}] resumed from {files.checkpoint} at step {position.step} "
                f"(epoch {position.epoch + 1}, resume {len(record.resumed)})")
    model, method, scheduler = training.model, training.method, training.scheduler
    clock = SteadyClock(device, min(TIMING_WARMUP_STEPS, training.total_steps // 2),
                        saved["timing"] if saved is not None else None)
    last_checkpoint = time.monotonic()
    progress = Progress(run.label, training.total_steps, options.progress_seconds if world.main else 0, log)
    step_log = StepLog(options.logs, files.record) if options.logs and files is not None and world.main else None

    def write_checkpoint() -> None:
        if files is None:
            return
        shards = training_state(training, monitor) if run.spec.fsdp else None
        ranks = gather_to_main(rank_state(generators, loss_sum, shards))  # every rank takes part; rank 0 writes
        if not world.main:
            return
        so_far = {"history": record.history, "best_epoch_metric": record.best_epoch_metric,
                  "epochs_completed": record.epochs_completed, "resumed": record.resumed}
        payload = checkpoint_payload(run, training, monitor, data.train, ranks, position, clock.snapshot(),
                                     so_far)
        seconds, size = checkpoint.save(files.checkpoint, payload)
        clock.add("checkpoint_s", seconds)
        clock.totals["checkpoints"] += 1
        clock.totals["checkpoint_bytes"] = size

    try:
        for epoch in range(position.epoch, recipe.epochs):
            remaining = steps_per_epoch - position.step_in_epoch
            if remaining > 0:
                if hasattr(data.train, "set_epoch"):
                    data.train.set_epoch(epoch)
                model.train()
                progress.begin_epoch(epoch, recipe.epochs, steps_per_epoch, position.step_in_epoch)
                clock.begin()
                epoch_start, wait_start = time.perf_counter(), clock.totals["data_wait_s"]
                for inputs, targets in waited_on(itertools.islice(data.train, remaining), data.train, clock):
                    loss = train_step(training, inputs, targets, recipe.grad_clip)
                    memory.settle()  # after this process's first step: the level a step's transients rise from
                    monitor.after_step()
                    if step_log is not None:
                        step_log.record(position.step + 1, epoch, loss, scheduler.get_last_lr()[0], method.diagnostics)
                    scheduler.step()
                    loss_sum += loss.detach()
                    position.step_in_epoch += 1
                    position.step += 1
                    clock.step_done()
                    progress.step(position.step, loss)
                    if position.step % sync_every:
                        continue
                    due = time.monotonic() - last_checkpoint >= 60 * options.checkpoint_minutes
                    signum, due = _agree(stop.signum, due)
                    if signum or (due and position.step_in_epoch < steps_per_epoch):
                        write_checkpoint()
                        last_checkpoint = time.monotonic()
                        if signum:
                            raise Stopped(signum, position.step)
                clock.end()
                progress.end_epoch()
                waited_s = clock.totals["data_wait_s"] - wait_start
                waited = waited_s / max(1e-9, time.perf_counter() - epoch_start)
                if waited > DATA_WAIT_WARNING and waited_s >= DATA_WAIT_WARNING_MIN_S and world.main:
                    log(f"[{run.label}] warning: training waited on its data loader {100 * waited:.0f}% of epoch "
                        f"{epoch + 1}'s time: more loader workers (--task-arg workers=N), faster storage, or a "
                        f"larger /dev/shm would speed it up")
            mean_loss = reduce_tensor_(loss_sum.clone(), "avg").item() / steps_per_epoch
            eval_start = time.perf_counter()
            with whole_weights(model):
                metric = task.evaluate(model, data.test) if math.isfinite(mean_loss) else float("nan")
            clock.add("eval_s", time.perf_counter() - eval_start)
            record.epochs_completed = epoch + 1
            record.history.append({"epoch": epoch + 1, "train_loss": mean_loss, task.metric: metric,
                                   "lr": scheduler.get_last_lr()[0], **method.diagnostics(), **monitor.epoch_summary()})
            if step_log is not None:
                step_log.epoch(position.step, record.history[-1])
            log(f"[{run.label}] epoch {epoch + 1}/{recipe.epochs} loss {mean_loss:.4f} {task.metric} {metric:.2f} "
                f"({clock.snapshot()['wall_s']:.1f}s)")
            if not math.isfinite(mean_loss):
                record.status, record.message = "diverged", f"non-finite training loss in epoch {epoch + 1}"
                break
            finite = [h[task.metric] for h in record.history]
            record.best_epoch_metric = max(finite) if task.higher_is_better else min(finite)
            position = Position(epoch + 1, 0, position.step)
            loss_sum = torch.zeros((), device=device)
            write_checkpoint()  # after the last epoch too: a run killed while finishing resumes here
            last_checkpoint = time.monotonic()
            signum, _ = _agree(stop.signum, False)
            if signum:
                raise Stopped(signum, position.step)

    finally:
        if step_log is not None:
            step_log.close(method.diagnostics())

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
    record.timing = timing


    record.memory = {**_max_over_ranks(gather(memory.read())), "state_bytes": training_state_bytes(model, method)}
    if record.status == "diverged":
        return
    method.finalize()
    tables, weights = level_tables(run, model, method), whole_state_dict(model)  # under FSDP: gathered
    with whole_weights(model):
        record.exactness = exactness_report(run, model)
        eval_start = time.perf_counter()
        record.metric = task.evaluate(model, data.test)
        timing["final_eval_s"] = time.perf_counter() - eval_start
    if files is not None and world.main:
        record.export = write_export(run, weights, tables, files.export, record)
    record.status = "ok"


def _max_over_ranks(readings: list[dict[str, Any]]) -> dict[str, Any]:
    """One memory reading from every rank's: the largest number of each field (peaks are per process)."""
    merged = dict(readings[0])
    for reading in readings[1:]:
        for key, value in reading.items():
            if isinstance(value, (int, float)) and isinstance(merged.get(key), (int, float)):
                merged[key] = max(merged[key], value)
    return merged


def exactness_report(run: ResolvedRun, model: torch.nn.Module) -> dict[str, Any]:
    """The exactness check of a finalized model: at most m distinct values per row of every quantized tensor."""
    if not run.method_cls.quantizes:
        return {"passed": None, "reason": "full-precision method"}
    checks = [check_exact(n, p, run.quantizer.granularity, run.quantizer.bits)
              for n, p in model.named_parameters() if run.task.is_quantized(n, p)]
    return {"passed": all(c.ok for c in checks), "granularity": run.quantizer.granularity,
            "tensors": {c.name: {"distinct": c.distinct, "allowed": c.allowed} for c in checks}}


def level_tables(run: ResolvedRun, model: torch.nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """After `finalize()`: the level table `(rows, m)` of each quantized tensor, by parameter name, whole (under
    FSDP gathered from every rank's rows); empty for a full-precision method."""
    if not run.method_cls.quantizes:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    tables = method.level_tables()
    if method.sharded:
        tables = whole_level_tables(tables, rows_span_ranks=run.quantizer.granularity == "tensor")
    return {names[id(p)]: q for p, q in zip(method.quantized_params(), tables)}


def write_export(run: ResolvedRun, weights: dict[str, torch.Tensor], tables: dict[str, torch.Tensor], path: Path,
                 record: RunRecord) -> dict[str, Any]:
    """Export the finalized model's state dict `weights` (packed indices and its `level_tables`); what the record
    says of it, or why not."""
    if record.exactness.get("passed") is False:
        return {"error": "not exported: the model is not exactly quantized"}
    metadata = {"run_id": run.run_id, "identity": run.identity, "metric_name": record.metric_name,
                "metric": record.metric}
    try:
        return export_model(path, weights, tables, run.quantizer if tables else None, metadata).to_dict()
    except QatbenchError as err:
        return {"error": str(err)}


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
    try:
        _train(run, record, files, options, stop if stop is not None else StopRequest())
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
