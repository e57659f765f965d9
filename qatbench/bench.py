"""`qatbench bench`: the cost of each method's training step, against the plain full-precision step.

Every method trains the same model, built exactly as a run builds it (`build_training`),
on the same task in one process. After a warm-up, the step (forward + backward +
`method.step` + `zero_grad`) is timed one step at a time, the methods taking turns in
several rounds so that a slow moment of a shared machine spreads over all of them; the
median is reported, with its ratio to the median FP step. Batches are drawn as they are
used, never stockpiled. Memory: the bytes of the training state (parameters, gradients,
optimizer and method state: latent weights, level tables), and on CUDA the peak
allocated memory of a method's steps run alone, with nothing else of the bench alive.
The level-table refresh (re-estimating Q for every quantized tensor) and the writing of one
in-run checkpoint (model, optimizer, method state, generators) are timed on their own.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .diagnostics import TransitionMonitor
from .errors import QatbenchError
from .loop import Position, checkpoint_payload, rank_state
from .step import Training, build_training, sync, train_step
from .opcount import StepOps, base_step_ops, count_step, refresh_ops, use_foreach
from .quant import as_rows, estimate_levels
from .registry import METHODS
from .spec import ResolvedRun, RunSpec, bind_data, resolve
from .system import training_state_bytes

STEP_TARGET = 1.10  # a method step may cost at most this many FP steps (plus its declared extra forwards)


@dataclasses.dataclass
class BenchRow:
    method: str
    bits: str
    step_ms: float
    ratio: float
    target: float
    state_mb: float
    state_ratio: float
    bytes_per_weight: float | None  # (state - FP state) / quantized weights: a latent copy, a row index, ...
    refresh_ms: float | None
    checkpoint_ms: float  # writing one in-run checkpoint (atomically, flushed to disk)
    checkpoint_mb: float
    peak_allocated_mb: float | None
    ops: StepOps | None = None  # operations dispatched by one method step outside a level refresh

    @property
    def met(self) -> bool:
        return self.ratio <= self.target



@dataclasses.dataclass
class _Contender:
    run: ResolvedRun
    training: Training
    times: list[float] = dataclasses.field(default_factory=list)


def _batches(train: Iterable) -> Iterator:
    """The training batches, epoch after epoch, drawn only when asked for."""
    while True:
        yield from train


def _build(run: ResolvedRun, steps_per_epoch: int) -> _Contender:
    torch.manual_seed(run.spec.seed)
    generator = torch.Generator(run.device).manual_seed(run.spec.seed + 1)
    return _Contender(run, build_training(run, steps_per_epoch, generator))


def _step(contender: _Contender, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    training = contender.training
    train_step(training, *batch, contender.run.recipe.grad_clip)


def _refresh_ms(contender: _Contender, repeats: int = 20) -> float | None:
    """Median time to re-estimate the levels of every quantized tensor."""
    if not contender.run.method_cls.quantizes:
        return None
    quantizer = contender.run.quantizer
    rows = [as_rows(p.detach(), quantizer.granularity) for p in contender.training.method.quantized_params()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for r in rows:
            estimate_levels(r, quantizer)
        sync(contender.run.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _refresh_next(method: Any) -> bool:
    """Whether the method's next step starts QAT or refreshes its levels (not the step to count)."""
    if not hasattr(method, "refresh_due"):
        return False
    t = method.steps - method.warmup_steps
    return t <= 0 or method.refresh_due(t)


def _step_ops(contender: _Contender, stream: Iterator) -> StepOps:
    """The operations of one step of the contender's method (its base optimizer on its foreach path),
    outside a level refresh, its probes counted apart; the base step's and one refresh's too."""
    method = contender.training.method
    use_foreach(method.optimizer)
    while _refresh_next(method):
        _step(contender, next(stream))
    counted: dict[str, Any] = {}
    step = method.step
    method.step = lambda closure=None: counted.setdefault("step", count_step(step, closure))
    try:
        _step(contender, next(stream))
    finally:
        del method.step
    counter = counted["step"]
    return StepOps(counter.total("step"), base_step_ops(method.optimizer), counter.total("probes"),
                   refresh_ops(method), counter.host_reads("step"))


def _checkpoint_cost(contender: _Contender, batches: Any) -> tuple[float, float]:
    """(milliseconds, MB) of writing one in-run checkpoint of the contender's training state."""
    run, training = contender.run, contender.training
    generators = {"data": torch.Generator(run.device), "method": torch.Generator(run.device)}
    ranks = [rank_state(generators, torch.zeros((), device=run.device), None)]
    payload = checkpoint_payload(run, training, TransitionMonitor(training.method), batches, ranks, Position(), {}, {})
    with tempfile.TemporaryDirectory() as folder:
        seconds, size = checkpoint.save(Path(folder) / "bench.ckpt", payload)
    return 1000 * seconds, size / 2**20


def _peak_allocated_mb(run: ResolvedRun, train: Iterable, steps_per_epoch: int, steps: int) -> float | None:
    """Peak CUDA memory of `steps` steps of one method, alone on the device (the data set excepted)."""
    if run.device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(run.device)
    contender = _build(run, steps_per_epoch)
    for batch in itertools.islice(_batches(train), steps):
        _step(contender, batch)
    sync(run.device)
    peak = torch.cuda.max_memory_allocated(run.device) / 2**20
    del contender
    return peak


def _with_baseline(specs: list[RunSpec]) -> list[RunSpec]:
    """`specs`, with the full-precision baseline first when none of them is one."""
    if any(not METHODS.get(s.method).quantizes for s in specs):
        return specs
    baselines = [name for name in METHODS.names() if not METHODS.get(name).quantizes]
    if len(baselines) != 1:
        raise QatbenchError(f"name the full-precision reference among --methods (one of {', '.join(baselines)})")
    return [dataclasses.replace(specs[0], method=baselines[0], bits=None, method_args={}), *specs]


def bench(specs: list[RunSpec], steps: int = 50, warmup: int = 10, rounds: int = 5, data_root: Path | None = None,
          download: bool = True) -> list[BenchRow]:
    """Median step time, its ratio to FP, training-state memory and refresh time of every spec's method.

    All specs must share one task and device; the full-precision baseline is added when missing."""
    runs = bind_data([resolve(s) for s in _with_baseline(specs)], data_root, download)
    if len({(r.task.name, r.device) for r in runs}) != 1:
        raise QatbenchError("qatbench bench compares methods on one task and one device at a time")
    first = runs[0]
    data = first.task.load_data(first.data, first.device, first.recipe.batch_size,
                                torch.Generator(first.device).manual_seed(0))
    steps_per_epoch = min(len(data.train), first.recipe.epoch_steps or len(data.train))
    stream = _batches(data.train)
    contenders = [_build(run, steps_per_epoch) for run in runs]
    for contender in contenders:  # warm-up: allocator, caches, first QAT step (latent copies)
        for batch in itertools.islice(stream, warmup):
            _step(contender, batch)
    sync(first.device)
    for _ in range(rounds):
        for contender in contenders:
            for batch in itertools.islice(stream, steps):
                start = time.perf_counter()
                _step(contender, batch)
                sync(first.device)
                contender.times.append(time.perf_counter() - start)

    fp = next(c for c in contenders if not c.run.method_cls.quantizes)
    fp_ms = 1000 * statistics.median(fp.times)
    fp_state = training_state_bytes(fp.training.model, fp.training.method)["total"]
    forward_share = _forward_ms(fp, stream) / fp_ms
    rows = []
    for contender in contenders:
        run, method = contender.run, contender.training.method
        step_ms = 1000 * statistics.median(contender.times)
        target = STEP_TARGET + method.extra_forward_passes() * forward_share
        state = training_state_bytes(contender.training.model, method)["total"]
        quantized = sum(p.numel() for p in method.quantized_params())
        checkpoint_ms, checkpoint_mb = _checkpoint_cost(contender, data.train)
        ops = _step_ops(contender, stream)
        rows.append(BenchRow(
            method=run.method_cls.name, bits=run.bits_text + (f"/{run.act_bits}" if run.act_bits else ""), step_ms=step_ms, ratio=step_ms / fp_ms, target=target,
            state_mb=state / 2**20, state_ratio=state / fp_state,
            bytes_per_weight=(state - fp_state) / quantized if run.method_cls.quantizes and quantized else None,
            refresh_ms=_refresh_ms(contender), checkpoint_ms=checkpoint_ms, checkpoint_mb=checkpoint_mb,
            peak_allocated_mb=None, ops=ops))
    del contenders, fp, contender, stream
    for row, run in zip(rows, runs):
        row.peak_allocated_mb = _peak_allocated_mb(run, data.train, steps_per_epoch, warmup + steps)
    return rows


def _forward_ms(contender: _Contender, stream: Iterator, repeats: int = 20) -> float:
    """Median time of one forward pass without a graph (what a zeroth-order probe costs)."""
    times = []
    with torch.no_grad():
        for inputs, targets in itertools.islice(stream, repeats):
            start = time.perf_counter()
            contender.training.compute_loss(inputs, targets)
            sync(contender.run.device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def markdown(rows: list[BenchRow]) -> str:
    from tabulate import tabulate

    ordered = sorted(rows, key=lambda r: (r.bits != "FP", r.method))
    table = [[r.method, r.bits, f"{r.step_ms:.3f}", f"{r.ratio:.2f}x", f"<= {r.target:.2f}x",
              "yes" if r.met else "NO", f"{r.state_mb:.3f}", f"{r.state_ratio:.2f}x",
              "" if r.bytes_per_weight is None else f"{r.bytes_per_weight:.2f}",
              "" if r.refresh_ms is None else f"{r.refresh_ms:.3f}", f"{r.checkpoint_ms:.1f}", f"{r.checkpoint_mb:.2f}",
              "" if r.peak_allocated_mb is None else f"{r.peak_allocated_mb:.0f}"] for r in ordered]
    timing = tabulate(table, headers=["method", "bits", "step ms (median)", "vs fp", "target", "met", "state MB",
                                      "vs fp", "bytes/weight", "refresh ms", "checkpoint ms", "checkpoint MB",
                                      "peak alloc MB"], tablefmt="github", disable_numparse=True)
    counted = [[r.method, r.bits, str(r.ops.step), str(r.ops.base), f"+{r.ops.extra}", str(r.ops.probes),
                "" if r.ops.refresh is None else str(r.ops.refresh), str(r.ops.host_reads)]
               for r in ordered if r.ops is not None]
    if not counted:
        return timing
    operations = tabulate(counted, headers=["method", "bits", "step ops", "base foreach step", "extra",
                                            "probe forward ops", "refresh ops", "host reads"],
                          tablefmt="github", disable_numparse=True)
    return (f"{timing}\n\nOperations dispatched by one method step outside a level refresh (aten operations, "
            f"counted with a dispatch mode; each is at least one kernel launch on a GPU):\n\n{operations}")
