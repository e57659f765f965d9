"""`qatbench bench`: the cost of each method's training step, against the plain full-precision step.

Every method trains the same model, built exactly as a run builds it (`build_training`),
on the same task in one process. After a warm-up, the step (forward + backward +
`method.step` + `zero_grad`) is timed one step at a time, the methods taking turns in
several rounds so that a slow moment of a shared machine spreads over all of them; the
median step is reported, with its ratio to FP taken round by round (each round's median against
the same round's FP median) and given as the median of those ratios with their min and max. A ratio
meets its target only where its whole spread lies below it, misses where its whole spread lies
above, and is "noisy: rerun" where the spread straddles it; the machine's load average before
and after is recorded beside. A method with a peer (the PARQ authors' reference, `torchao-*`)
is also compared with it, rule by rule, in the same way. Batches are drawn as they are
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
import os
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
from .registry import METHODS
from .spec import ResolvedRun, RunSpec, bind_data, resolve
from .system import training_state_bytes

STEP_TARGET = 1.10  # a method step may cost at most this many FP steps (plus its declared extra forwards)
PEER_TARGET = {"cpu": 1.0, "cuda": 0.5}  # qatbench's step against its peer's: ahead on the CPU, half on a GPU


@dataclasses.dataclass(frozen=True)
class Spread:
    """A ratio over the rounds (each round's median step against the same round's): median, lowest, highest."""

    median: float
    low: float
    high: float

    def verdict(self, target: float) -> str:
        """"yes" where the whole spread is at most the target, "NO" where it is all above, else "noisy: rerun"."""
        if self.high <= target:
            return "yes"
        return "NO" if self.low > target else "noisy: rerun"

    def text(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


class _RatioRow:
    """A row with a ratio's median and spread over rounds (`ratio`, `ratio_low`, `ratio_high`) and its `target`."""

    ratio: float
    ratio_low: float
    ratio_high: float
    target: float

    @property
    def spread(self) -> Spread:
        return Spread(self.ratio, self.ratio_low, self.ratio_high)

    @property
    def verdict(self) -> str:
        return self.spread.verdict(self.target)


@dataclasses.dataclass
class BenchRow(_RatioRow):
    method: str
    bits: str
    step_ms: float
    ratio: float
    ratio_low: float  # the lowest and highest of the rounds' ratios to FP
    ratio_high: float
    target: float
    state_mb: float
    state_ratio: float
    bytes_per_weight: float | None  # (state - FP state) / quantized weights: a latent copy, a row index, ...
    refresh_ms: float | None
    checkpoint_ms: float  # writing one in-run checkpoint (atomically, flushed to disk)
    checkpoint_mb: float
    peak_allocated_mb: float | None
    ops: StepOps | None = None  # operations dispatched by one method step outside a level refresh


@dataclasses.dataclass
class PeerRow(_RatioRow):
    """qatbench's step against its peer's (the same rule in the PARQ authors' reference), same model and data."""

    rule: str
    peer: str
    bits: str
    step_ms: float
    peer_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    target: float


@dataclasses.dataclass
class BenchResult:
    rows: list[BenchRow]
    peers: list[PeerRow]
    load_before: tuple[float, float, float] | None  # os.getloadavg(): 1, 5 and 15 minutes
    load_after: tuple[float, float, float] | None
    cpus: int


@dataclasses.dataclass
class _Contender:
    run: ResolvedRun
    training: Training
    times: list[list[float]] = dataclasses.field(default_factory=list)  # per round

    @property
    def all_times(self) -> list[float]:
        return [t for round_times in self.times for t in round_times]


def _spread(ours: _Contender, theirs: _Contender) -> Spread:
    """`ours / theirs` round by round (the two contenders' median steps in the same round, which share the
    machine's state): the median, lowest and highest of those ratios, so the median always lies in its spread."""
    per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(ours.times, theirs.times)]
    return Spread(statistics.median(per_round), min(per_round), max(per_round))


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # not on every platform
        return None


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
    """Median time of the method's own re-estimation of the levels of every quantized tensor (None for a method
    without levels, or one whose QAT has not started)."""
    method = contender.training.method
    if not contender.run.method_cls.quantizes or not getattr(method, "qat_started", False):
        return None
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            method.refresh_levels()
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
          download: bool = True) -> BenchResult:
    """Median step time, its ratio to FP (and to its peer's) with their spreads, training-state memory and refresh
    time of every spec's method.

    All specs must share one task and device; the full-precision baseline is added when missing."""
    load_before = _load()
    runs = bind_data([resolve(s) for s in _with_baseline(specs)], data_root, download)
    if len({(r.task.name, r.device) for r in runs}) != 1:
        raise QatbenchError("qatbench bench compares methods on one task and one device at a time")
    first = runs[0]
    data = first.task.load_data(first.data, first.device, first.recipe.batch_size,
                                torch.Generator(first.device).manual_seed(0))
    if len(data.train) == 0:
        raise QatbenchError(f"the training set of {first.task.name} holds fewer samples than one batch "
                            f"({first.recipe.batch_size}): pass a smaller --batch-size")
    steps_per_epoch = min(len(data.train), first.recipe.epoch_steps or len(data.train))
    stream = _batches(data.train)
    contenders = [_build(run, steps_per_epoch) for run in runs]
    for contender in contenders:  # warm-up: allocator, caches, first QAT step (latent copies)
        for batch in itertools.islice(stream, warmup):
            _step(contender, batch)
    sync(first.device)
    for _ in range(rounds):
        for contender in contenders:
            contender.times.append([])
            for batch in itertools.islice(stream, steps):
                start = time.perf_counter()
                _step(contender, batch)
                sync(first.device)
                contender.times[-1].append(time.perf_counter() - start)
    load_after = _load()

    fp = next(c for c in contenders if not c.run.method_cls.quantizes)
    fp_ms = 1000 * statistics.median(fp.all_times)
    fp_state = training_state_bytes(fp.training.model, fp.training.method)["total"]
    forward_share = _forward_ms(fp, stream) / fp_ms
    rows = []
    for contender in contenders:
        run, method = contender.run, contender.training.method
        step_ms = 1000 * statistics.median(contender.all_times)
        spread = _spread(contender, fp)
        target = STEP_TARGET + method.extra_forward_passes() * forward_share
        state = training_state_bytes(contender.training.model, method)["total"]
        quantized = sum(p.numel() for p in method.quantized_params())
        checkpoint_ms, checkpoint_mb = _checkpoint_cost(contender, data.train)
        ops = _step_ops(contender, stream)
        rows.append(BenchRow(
            method=run.method_cls.name, bits=_bits(run), step_ms=step_ms, ratio=spread.median, ratio_low=spread.low,
            ratio_high=spread.high, target=target,
            state_mb=state / 2**20, state_ratio=state / fp_state,
            bytes_per_weight=(state - fp_state) / quantized if run.method_cls.quantizes and quantized else None,
            refresh_ms=_refresh_ms(contender), checkpoint_ms=checkpoint_ms, checkpoint_mb=checkpoint_mb,
            peak_allocated_mb=None, ops=ops))
    peers = _peer_rows(contenders, first.device.type)
    del contenders, fp, contender, stream
    for row, run in zip(rows, runs):
        row.peak_allocated_mb = _peak_allocated_mb(run, data.train, steps_per_epoch, warmup + steps)
    return BenchResult(rows, peers, load_before, load_after, os.cpu_count() or 1)


def _bits(run: ResolvedRun) -> str:
    return run.bits_text + (f"/{run.act_bits}" if run.act_bits else "")


def _peer_rows(contenders: list[_Contender], device_type: str) -> list[PeerRow]:
    """Every contender against its peer (`Method.peer_of`: the qatbench method whose rule a reference method
    runs) at the same bits, where both are benched."""
    by_rule = {(c.run.method_cls.name, _bits(c.run)): c for c in contenders}
    rows = []
    for theirs in contenders:
        rule = getattr(theirs.run.method_cls, "peer_of", None)
        ours = by_rule.get((rule, _bits(theirs.run)))
        if ours is None:
            continue
        spread = _spread(ours, theirs)
        rows.append(PeerRow(rule, theirs.run.method_cls.name, _bits(ours.run),
                            1000 * statistics.median(ours.all_times), 1000 * statistics.median(theirs.all_times),
                            spread.median, spread.low, spread.high, PEER_TARGET.get(device_type, 1.0)))
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


def markdown(result: BenchResult) -> str:
    from tabulate import tabulate

    ordered = sorted(result.rows, key=lambda r: (r.bits != "FP", r.method))
    table = [[r.method, r.bits, f"{r.step_ms:.3f}", r.spread.text(), f"<= {r.target:.2f}x",
              r.verdict, f"{r.state_mb:.3f}", f"{r.state_ratio:.2f}x",
              "" if r.bytes_per_weight is None else f"{r.bytes_per_weight:.2f}",
              "" if r.refresh_ms is None else f"{r.refresh_ms:.3f}", f"{r.checkpoint_ms:.1f}", f"{r.checkpoint_mb:.2f}",
              "" if r.peak_allocated_mb is None else f"{r.peak_allocated_mb:.0f}"] for r in ordered]
    timing = tabulate(table, headers=["method", "bits", "step ms (median)", "vs fp: rounds' median (min-max)", "target", "met",
                                      "state MB",
                                      "vs fp", "bytes/weight", "refresh ms", "checkpoint ms", "checkpoint MB",
                                      "peak alloc MB"], tablefmt="github", disable_numparse=True)
    counted = [[r.method, r.bits, str(r.ops.step), str(r.ops.base), f"+{r.ops.extra}", str(r.ops.probes),
                "" if r.ops.refresh is None else str(r.ops.refresh), str(r.ops.host_reads)]
               for r in ordered if r.ops is not None]
    parts = [_load_line(result), timing]
    if result.peers:
        peers = [[p.rule, p.peer, p.bits, f"{p.step_ms:.3f}", f"{p.peer_ms:.3f}",
                  p.spread.text(), f"<= {p.target:.2f}x", p.verdict] for p in sorted(result.peers, key=lambda p: p.rule)]
        parts.append("Against the PARQ authors' reference (torchao.prototype.parq), the same rule on the same model, "
                     "data and seed (the contenders draw consecutive batches of one stream, taking turns):\n\n"
                     + tabulate(peers, headers=[
                         "rule", "reference", "bits", "qatbench ms", "reference ms", "qatbench / reference: "
                         "rounds' median (min-max)", "target", "met"], tablefmt="github", disable_numparse=True))
    if counted:
        operations = tabulate(counted, headers=["method", "bits", "step ops", "base foreach step", "extra",
                                                "probe forward ops", "refresh ops", "host reads"],
                              tablefmt="github", disable_numparse=True)
        parts.append("Operations dispatched by one method step outside a level refresh (aten operations, counted "
                     f"with a dispatch mode; each is at least one kernel launch on a GPU):\n\n{operations}")
    return "\n\n".join(parts)


def _load_line(result: BenchResult) -> str:
    def text(load: tuple[float, float, float] | None) -> str:
        return "unknown" if load is None else f"{load[0]:.2f}"

    return (f"Load average (1 min) {text(result.load_before)} before, {text(result.load_after)} after the timed "
            f"rounds, on {result.cpus} CPUs; a verdict is given only where a ratio's spread over the rounds does "
            f"not straddle its target (\"noisy: rerun\" otherwise).")
