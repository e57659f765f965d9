"""Runs one (method, task, bits, seed) and returns its RunRecord; runs many and keeps every finished one.

The training loop is one plain function (`_train`), readable top to bottom:
data, forward, loss, backward, `method.step(closure)`, LR schedule, per-epoch
log and evaluation; then `finalize()`, the exactness check and the final
evaluation.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import QatbenchError, check_choice
from .diagnostics import TransitionMonitor
from .method import Method
from .params import build_config
from .quant import QuantizerConfig, bits_label, check_exact
from .registry import METHODS, TASKS
from .results import FINISHED, RunRecord, identity_hash, read_record, record_path, write_record
from .system import PeakMemory, environment
from .task import Recipe, Task, published

Log = Callable[[str], None]
FP_DIAGNOSTIC_BITS = 2  # levels a full-precision run's transition diagnostics are measured against
TIMING_WARMUP_STEPS = 10  # steps excluded from the steady-state step time (allocator, caches, compile)
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What the user asked for; `resolve` fills in every default."""

    method: str
    task: str
    bits: int | None
    seed: int = 0
    recipe: str = "paper"
    method_args: dict[str, str] = dataclasses.field(default_factory=dict)
    task_args: dict[str, str] = dataclasses.field(default_factory=dict)
    scheme: str | None = None  # None: the task's default
    granularity: str | None = None  # None: the task's default
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    device: str = "cpu"
    init: str | None = None  # a full-precision checkpoint (state dict) to start from
    precision: str = "auto"  # auto (the recipe's choice for the device) | fp32 | bf16 (autocast; evaluation stays fp32)
    compile: str = "none"  # torch.compile mode of the model: none | default | reduce-overhead | max-autotune
    channels_last: bool = False  # conv weights and image batches in NHWC memory order


@dataclasses.dataclass
class ResolvedRun:
    """A RunSpec with its plugins looked up, validated, and its identity computed."""

    spec: RunSpec
    method_cls: type[Method]
    method_config: Any
    task: Task
    recipe: Recipe
    quantizer: QuantizerConfig  # for a full-precision method: the levels of its diagnostics only
    device: torch.device
    identity: dict[str, Any]
    run_id: str

    @property
    def precision(self) -> str:
        """The resolved precision: fp32 or bf16."""
        return self.identity["precision"]

    @property
    def bits(self) -> int | None:
        return self.quantizer.bits if self.method_cls.quantizes else None

    @property
    def bits_text(self) -> str:
        return bits_label(self.bits)

    @property
    def label(self) -> str:
        return f"{self.task.name} {self.method_cls.name} b{self.bits_text} s{self.spec.seed}"


def resolve_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise QatbenchError(f"invalid device {text!r}; valid choices: cpu, cuda, cuda:N") from None
    check_choice("device type", device.type, ("cpu", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QatbenchError(f"device {text!r} requested but no CUDA device is available; use --device cpu")
    return device


def resolve(spec: RunSpec) -> ResolvedRun:
    """Look up and validate everything a run needs, before any training starts."""
    method_cls = METHODS.get(spec.method)
    task_cls = TASKS.get(spec.task)
    method_config = build_config(method_cls.Config, spec.method_args, f"method {spec.method!r}")
    task = task_cls(build_config(task_cls.Config, spec.task_args, f"task {spec.task!r}"))
    check_choice("recipe", spec.recipe, task.recipes)
    for name in ("epochs", "batch_size"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise QatbenchError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if spec.lr is not None and not (spec.lr > 0 and math.isfinite(spec.lr)):
        raise QatbenchError(f"--lr {spec.lr} must be a positive number")
    recipe = task.recipes[spec.recipe].with_overrides(spec.epochs, spec.batch_size, spec.lr)
    if method_cls.quantizes and spec.bits is None:
        raise QatbenchError(f"method {spec.method!r} quantizes: give --bits (1..8 or T)")
    scheme = check_choice("quantizer scheme", spec.scheme or task.default_scheme, ("uniform", "lsbq"))
    granularity = check_choice("granularity", spec.granularity or task.default_granularity, ("channel", "tensor"))
    bits = spec.bits if method_cls.quantizes else FP_DIAGNOSTIC_BITS
    quantizer = QuantizerConfig(bits=bits, scheme=scheme, granularity=granularity)
    device = resolve_device(spec.device)
    check_choice("precision", spec.precision, PRECISIONS)
    check_choice("compile mode", spec.compile, COMPILE_MODES)
    init = _checkpoint_identity(spec.init) if spec.init else None
    identity = {
        "method": method_cls.name,
        "method_config": dataclasses.asdict(method_config),
        "task": task_cls.name,
        "task_config": dataclasses.asdict(task.config),
        "recipe": spec.recipe,
        "recipe_config": dataclasses.asdict(recipe),
        "quantizer": dataclasses.asdict(quantizer),
        "seed": spec.seed,
        "device_type": device.type,
        "init": init,
        "precision": spec.precision if spec.precision != "auto" else (
            recipe.cuda_precision if device.type == "cuda" else "fp32"),
        "compile": spec.compile,
        "channels_last": spec.channels_last,
    }
    return ResolvedRun(spec, method_cls, method_config, task, recipe, quantizer, device, identity, identity_hash(identity))


def _checkpoint_identity(path_text: str) -> dict[str, str]:
    """A checkpoint enters the run's identity by its content, not by where it lies."""
    path = Path(path_text)
    if not path.is_file():
        raise QatbenchError(f"--init {path_text!r}: no such checkpoint file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": path.name, "sha256": digest.hexdigest()[:16]}


def _load_checkpoint(model: torch.nn.Module, path: str, task: str, device: torch.device) -> None:
    state = torch.load(path, map_location=device, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QatbenchError(f"checkpoint {path!r} does not fit task {task!r}: {len(missing)} missing keys "
                            f"({', '.join(missing[:3])}...), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}...)")


def loss_function(run: ResolvedRun, model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch loss under the run's speed options: channels-last memory, bf16 autocast, torch.compile.

    The methods keep acting on `model`'s own parameters; a compiled model reads them on
    every call, so in-place updates between steps are seen."""
    spec = run.spec
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = model if spec.compile == "none" else torch.compile(model, mode=spec.compile)
    bf16 = run.precision == "bf16"

    def compute_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if spec.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
            return run.task.loss(forward(inputs), targets)

    return compute_loss


def train_step(compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], method: Method,
               inputs: torch.Tensor, targets: torch.Tensor, grad_clip: float = 0.0) -> torch.Tensor:
    """One step: forward and backward at the model's current weights, optional gradient-norm
    clipping, then the method's step.

    The closure re-evaluates this batch's loss at whatever weights the method has set,
    forward only (FOGZO's probes)."""
    loss = compute_loss(inputs, targets)
    loss.backward()
    if grad_clip > 0:
        params = [p for group in method.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)

    def closure() -> torch.Tensor:
        with torch.no_grad():
            return compute_loss(inputs, targets)

    method.step(closure)
    method.zero_grad()
    return loss


def _seed_everything(seed: int) -> None:
    """Seed torch, and the global RNGs some libraries draw from (timm's mixup uses numpy's)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(run: ResolvedRun, record: RunRecord, data_root: Path | None, download: bool, log: Log,
           checkpoint: Path | None) -> None:
    """Train, finalize, check exactness and evaluate, filling `record` as it goes."""
    device, recipe, task = run.device, run.recipe, run.task
    _seed_everything(run.spec.seed)
    data_generator = torch.Generator(device).manual_seed(run.spec.seed)
    method_generator = torch.Generator(device).manual_seed(run.spec.seed + 1)
    memory = PeakMemory(device)
    memory.start()

    data = task.load_data(data_root, device, recipe.batch_size, data_generator, download)
    record.num_train, record.num_test = data.num_train, data.num_test
    model = task.build_model().to(device)
    if run.spec.init:
        _load_checkpoint(model, run.spec.init, task.name, device)
    compute_loss = loss_function(run, model)
    optimizer = recipe.make_optimizer(task.param_groups(model))
    steps_per_epoch = min(len(data.train), recipe.epoch_steps or len(data.train))
    if steps_per_epoch == 0:
        raise QatbenchError(f"batch size {recipe.batch_size} exceeds the {data.num_train} training examples")
    total_steps = recipe.epochs * steps_per_epoch
    scheduler = recipe.make_scheduler(optimizer, steps_per_epoch)
    method = run.method_cls(run.method_config, optimizer, run.quantizer, total_steps, method_generator)
    monitor = TransitionMonitor(method)

    timing = {"warmup_steps": min(TIMING_WARMUP_STEPS, total_steps // 2), "steady_train_s": 0.0, "eval_s": 0.0}
    steady_steps = 0
    start = time.perf_counter()
    step = 0
    for epoch in range(recipe.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        epoch_start = time.perf_counter()
        for inputs, targets in itertools.islice(data.train, steps_per_epoch):
            if step == timing["warmup_steps"]:
                _sync(device)
                timing["warmup_s"] = time.perf_counter() - start
                epoch_start = time.perf_counter()
                steady_steps -= step - epoch * steps_per_epoch
            loss = train_step(compute_loss, method, inputs, targets, recipe.grad_clip)
            monitor.after_step()
            scheduler.step()
            loss_sum += loss.detach()
            step += 1
        _sync(device)
        timing["steady_train_s"] += time.perf_counter() - epoch_start
        steady_steps += steps_per_epoch
        mean_loss = loss_sum.item() / steps_per_epoch
        eval_start = time.perf_counter()
        metric = task.evaluate(model, data.test) if math.isfinite(mean_loss) else float("nan")
        timing["eval_s"] += time.perf_counter() - eval_start
        record.epochs_completed = epoch + 1
        record.history.append({"epoch": epoch + 1, "train_loss": mean_loss, task.metric: metric,
                               "lr": scheduler.get_last_lr()[0], **method.diagnostics(), **monitor.epoch_summary()})
        log(f"[{run.label}] epoch {epoch + 1}/{recipe.epochs} loss {mean_loss:.4f} {task.metric} {metric:.2f} "
            f"({time.perf_counter() - start:.1f}s)")
        if not math.isfinite(mean_loss):
            record.status, record.message = "diverged", f"non-finite training loss in epoch {epoch + 1}"
            break
        finite = [h[task.metric] for h in record.history]
        record.best_epoch_metric = max(finite) if task.higher_is_better else min(finite)

    timing["steady_step_ms"] = 1000 * timing["steady_train_s"] / max(1, steady_steps)
    timing["steady_steps"] = steady_steps
    if timing["steady_train_s"] > 0:
        timing["samples_per_s"] = steady_steps * recipe.batch_size / timing["steady_train_s"]
        if task.tokens_per_sample():
            timing["tokens_per_s"] = timing["samples_per_s"] * task.tokens_per_sample()
    timing["train_s"] = time.perf_counter() - start - timing["eval_s"]
    record.timing = timing
    if record.status == "diverged":
        record.memory = memory.read()
        return
    method.finalize()
    quantized = [(n, p) for n, p in model.named_parameters() if task.is_quantized(n, p)]
    if not run.method_cls.quantizes:
        record.exactness = {"passed": None, "reason": "full-precision method"}
    else:
        checks = [check_exact(n, p, run.quantizer.granularity, run.quantizer.bits) for n, p in quantized]
        record.exactness = {
            "passed": all(c.ok for c in checks),
            "granularity": run.quantizer.granularity,
            "tensors": {c.name: {"distinct": c.distinct, "allowed": c.allowed} for c in checks},
        }
    eval_start = time.perf_counter()
    record.metric = task.evaluate(model, data.test)
    timing["final_eval_s"] = time.perf_counter() - eval_start
    record.memory = memory.read()
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), checkpoint)
        record.checkpoint = str(checkpoint)
    record.status = "ok"


def execute(run: ResolvedRun, data_root: Path | None = None, download: bool = True, log: Log = print,
            command: str | None = None, checkpoint: Path | None = None) -> RunRecord:
    """One run. Training failures become a record status; user errors (bad data path) raise.

    With `checkpoint`, the final model's state dict is saved there (what `--init` takes)."""
    record = RunRecord(
        run_id=run.run_id, spec=run.identity, method=run.method_cls.name, task=run.task.name,
        bits=run.bits, seed=run.spec.seed, status="error",
        metric_name=run.task.metric, higher_is_better=run.task.higher_is_better,
        reference_fp=published(run.task.name).get("fp"), environment=environment(run.device), command=command,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    start = time.perf_counter()
    try:
        _train(run, record, data_root, download, log, checkpoint)
    except QatbenchError:
        raise
    except KeyboardInterrupt:
        record.status, record.message = "interrupted", "interrupted by the user (Ctrl-C)"
    except torch.OutOfMemoryError as err:
        record.status, record.message = "oom", str(err).splitlines()[0]
    except Exception as err:  # recorded, so that one broken run never stops a sweep
        record.status, record.message = "error", f"{type(err).__name__}: {err}"
    record.timing["total_s"] = time.perf_counter() - start
    return record


def run_all(runs: list[ResolvedRun], out_dir: Path, data_root: Path | None = None, download: bool = True,
            force: bool = False, log: Log = print, command: str | None = None) -> list[RunRecord]:
    """Run each spec whose record is missing or unfinished; write each record as soon as it exists.

    A Ctrl-C ends the sweep after the interrupted run's record is written; every
    record written before it stays.
    """
    records = []
    for run in runs:
        path = record_path(out_dir, run.task.name, run.method_cls.name, run.bits_text, run.spec.seed, run.run_id)
        if path.exists() and not force:
            try:
                existing = read_record(path)
            except (OSError, ValueError, TypeError, KeyError):
                existing = None
            if existing is not None and existing.status in FINISHED:
                log(f"[{run.label}] skipped: record exists ({path}); --force reruns it")
                records.append(existing)
                continue
        # full-precision runs keep their weights: the starting point of fine-tuning QAT (--init)
        checkpoint = None if run.method_cls.quantizes else path.with_suffix(".pt")
        record = execute(run, data_root, download, log, command, checkpoint)
        write_record(path, record)
        records.append(record)
        log(summary_line(run.label, record, path))
        if record.status == "interrupted":
            raise KeyboardInterrupt
    return records


def summary_line(label: str, record: RunRecord, path: Path) -> str:
    if record.status != "ok":
        return f"[{label}] {record.status}: {record.message} -> {path}"
    exact = {True: "exactly quantized", False: "NOT exactly quantized", None: "full precision"}[record.exactness["passed"]]
    return (f"[{label}] ok: {record.metric_name} {record.metric:.2f}, {exact}, "
            f"{record.timing['steady_step_ms']:.3f} ms/step -> {path}")
