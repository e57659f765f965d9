"""`qatbench bench`: the cost of each method's training step, against the plain full-precision step.

Every method trains the same model on the same pre-drawn batches in one process.
After a warm-up, the step (forward + backward + `method.step` + `zero_grad`) is
timed one step at a time, the methods taking turns in several rounds so that a
slow moment of a shared machine spreads over all of them; the median is reported,
with its ratio to the median FP step. Memory: the bytes of the training state
(parameters, gradients, optimizer and method state: latent weights, level
tables), and on CUDA the peak allocated memory of a method's steps run alone.
The level-table refresh (re-estimating Q for every quantized tensor) is timed on
its own.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import QatbenchError
from .harness import ResolvedRun, RunSpec, _sync, loss_function, resolve, train_step
from .method import Method
from .quant import as_rows, estimate_levels

STEP_TARGET = 1.10  # a method step may cost at most this many FP steps
ZEROTH_ORDER = ("fogzo", "nspsa")  # methods that pay for extra forward passes by design


@dataclasses.dataclass
class BenchRow:
    method: str
    bits: str
    step_ms: float
    ratio: float
    target: float
    state_mb: float
    state_ratio: float
    state_target_mb: float  # FP state + one latent copy of the quantized weights + the level tables
    refresh_ms: float | None
    peak_allocated_mb: float | None

    @property
    def met(self) -> bool:
        return self.ratio <= self.target

    @property
    def memory_met(self) -> bool:
        return self.state_mb <= self.state_target_mb


@dataclasses.dataclass
class _Contender:
    run: ResolvedRun
    model: torch.nn.Module
    method: Method
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    times: list[float] = dataclasses.field(default_factory=list)


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of every distinct tensor storage in a nested structure of dicts, lists and tensors."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def training_state_bytes(model: torch.nn.Module, method: Method) -> int:
    """Parameters, buffers, gradients, and the method's state (its optimizer's included)."""
    seen: set[int] = set()
    total = sum(_tensor_bytes(t, seen) for t in itertools.chain(model.parameters(), model.buffers()))
    total += sum(_tensor_bytes(p.grad, seen) for p in model.parameters() if p.grad is not None)
    return total + _tensor_bytes(method.state_dict(), seen)


def _build(run: ResolvedRun, total_steps: int) -> _Contender:
    torch.manual_seed(run.spec.seed)
    model = run.task.build_model().to(run.device)
    compute_loss = loss_function(run, model)  # before the optimizer: it may change the weights' memory format
    optimizer = run.recipe.make_optimizer(run.task.param_groups(model))
    generator = torch.Generator(run.device).manual_seed(run.spec.seed + 1)
    method = run.method_cls(run.method_config, optimizer, run.quantizer, total_steps, generator)
    return _Contender(run, model, method, compute_loss)


def _step(contender: _Contender, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    train_step(contender.compute_loss, contender.method, inputs, targets, contender.run.recipe.grad_clip)


def _refresh_ms(contender: _Contender, repeats: int = 20) -> float | None:
    """Median time to re-estimate the levels of every quantized tensor."""
    if not contender.run.method_cls.quantizes:
        return None
    quantizer = contender.run.quantizer
    rows = [as_rows(p.detach(), quantizer.granularity) for p in contender.method.quantized_params()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for r in rows:
            estimate_levels(r, quantizer)
        _sync(contender.run.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _peak_allocated_mb(run: ResolvedRun, batches: list, steps: int) -> float | None:
    """Peak CUDA memory of `steps` steps of one method, alone on the device."""
    if run.device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(run.device)
    contender = _build(run, steps)
    for inputs, targets in itertools.islice(itertools.cycle(batches), steps):
        _step(contender, inputs, targets)
    _sync(run.device)
    peak = torch.cuda.max_memory_allocated(run.device) / 2**20
    del contender
    return peak


def bench(specs: list[RunSpec], steps: int = 50, warmup: int = 10, rounds: int = 5, data_root: Path | None = None,
          download: bool = True) -> list[BenchRow]:
    """Median step time, its ratio to FP, training-state memory and refresh time of every spec's method.

    All specs must share one task and device; an `fp` spec is added when missing.
    """
    if not any(s.method == "fp" for s in specs):
        specs = [dataclasses.replace(specs[0], method="fp", bits=None, method_args={}), *specs]
    runs = [resolve(s) for s in specs]
    if len({(r.task.name, r.device) for r in runs}) != 1:
        raise QatbenchError("qatbench bench compares methods on one task and one device at a time")
    first = runs[0]
    generator = torch.Generator(first.device).manual_seed(0)
    data = first.task.load_data(data_root, first.device, first.recipe.batch_size, generator, download)
    batches = list(itertools.islice(iter(data.train), min(len(data.train), warmup + steps)))
    contenders = [_build(run, 10 * (warmup + steps * rounds)) for run in runs]
    for contender in contenders:  # warm-up: allocator, caches, first QAT step (latent copies)
        for inputs, targets in itertools.islice(itertools.cycle(batches), warmup):
            _step(contender, inputs, targets)
    _sync(first.device)
    for _ in range(rounds):
        for contender in contenders:
            for inputs, targets in itertools.islice(itertools.cycle(batches), steps):
                start = time.perf_counter()
                _step(contender, inputs, targets)
                _sync(first.device)
                contender.times.append(time.perf_counter() - start)

    fp = next(c for c in contenders if c.run.method_cls.name == "fp")
    fp_ms = 1000 * statistics.median(fp.times)
    fp_state = training_state_bytes(fp.model, fp.method)
    forward_share = _forward_ms(fp, batches) / fp_ms
    rows = []
    for contender in contenders:
        run = contender.run
        step_ms = 1000 * statistics.median(contender.times)
        target = STEP_TARGET
        if run.method_cls.name in ZEROTH_ORDER:
            target = 1 + 2 * run.method_config.samples * forward_share
        state = training_state_bytes(contender.model, contender.method)
        allowance = 0
        if run.method_cls.quantizes:
            quantized = contender.method.quantized_params()
            tables = getattr(contender.method, "levels", []) + getattr(contender.method, "bounds", [])
            allowance = sum(p.numel() * p.element_size() for p in quantized) + sum(q.nbytes for q in tables)
        rows.append(BenchRow(
            method=run.method_cls.name, bits=run.bits_text, step_ms=step_ms, ratio=step_ms / fp_ms, target=target,
            state_mb=state / 2**20, state_ratio=state / fp_state, state_target_mb=(fp_state + allowance) / 2**20,
            refresh_ms=_refresh_ms(contender), peak_allocated_mb=None))
    del contenders
    for row, run in zip(rows, runs):
        row.peak_allocated_mb = _peak_allocated_mb(run, batches, warmup + steps)
    return rows


def _forward_ms(contender: _Contender, batches: list, repeats: int = 20) -> float:
    """Median time of one forward pass without a graph (what a zeroth-order probe costs)."""
    times = []
    with torch.no_grad():
        for inputs, targets in itertools.islice(itertools.cycle(batches), repeats):
            start = time.perf_counter()
            contender.compute_loss(inputs, targets)
            _sync(contender.run.device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def markdown(rows: list[BenchRow]) -> str:
    from tabulate import tabulate

    ordered = sorted(rows, key=lambda r: (r.method != "fp", r.method))
    table = [[r.method, r.bits, f"{r.step_ms:.3f}", f"{r.ratio:.2f}x", f"<= {r.target:.2f}x",
              "yes" if r.met else "NO", f"{r.state_mb:.3f}", f"{r.state_ratio:.2f}x",
              f"<= {r.state_target_mb:.3f}", "yes" if r.memory_met else "NO",
              "" if r.refresh_ms is None else f"{r.refresh_ms:.3f}",
              "" if r.peak_allocated_mb is None else f"{r.peak_allocated_mb:.0f}"] for r in ordered]
    return tabulate(table, headers=["method", "bits", "step ms (median)", "vs fp", "target", "met", "state MB",
                                    "vs fp", "target MB", "met", "refresh ms", "peak alloc MB"],
                    tablefmt="github", disable_numparse=True)
