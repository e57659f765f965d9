"""One training step, and everything a run trains with: the model, its loss, the base optimizer, the LR
schedule and the method, built the same way by a run, by `qatbench bench` and by `qatbench export`.

`train_step` is one step: forward and backward at the model's current weights (over the batch's
micro-batches, if any), optional gradient clipping, then the method's step, with a closure that
re-evaluates the batch's loss for the methods that probe it (FOGZO).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch

from .distributed import World, reduce_tensor_
from .errors import QatbenchError
from .export import check_fits, load_export
from .activations import attach, is_step
from .method import Method
from .sharding import gradient_sync_paused, shard_model
from .spec import ResolvedRun

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    model = build_model(run)
    if run.spec.init:
        _load_init(model, run.spec.init, run.task.name, run.device)
    if run.spec.channels_last:  # before the optimizer and the method: it changes the weights' memory format
        model.to(memory_format=torch.channels_last)
    if run.spec.fsdp:
        quantized = [name for name, p in model.named_parameters() if run.task.is_quantized(name, p)]
        shard_model(model, run.task.shard_units(model), quantized, world, run.device)
    optimizer = run.recipe.make_optimizer(param_groups(run, model))
    total_steps = run.recipe.epochs * steps_per_epoch
    method = run.method_cls(run.method_config, optimizer, run.quantizer, total_steps, method_generator)
    scheduler = run.recipe.make_scheduler(optimizer, steps_per_epoch)  # after the method's groups are there
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


def build_model(run: ResolvedRun) -> torch.nn.Module:
    """The task's model on the run's device, with an input quantizer on each layer whose input the task quantizes
    when the run quantizes activations (`qatbench.activations`; off until calibrated for a method that does not
    train them)."""
    model = run.task.build_model().to(run.device)
    if run.act_bits:
        activations = run.identity_activations
        for quantizer in attach(run.task.activation_inputs(model), run.act_bits, activations["form"],
                                activations["init"]):
            quantizer.enabled = activations["trained"]
    return model


def param_groups(run: ResolvedRun, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The task's parameter groups, and where the run learns steps, a group of its own for them (the activations'
    steps; a method that learns the weights' steps adds them): no weight decay, the learning rate and momentum the
    run's identity says (`steps`; None: the recipe's)."""
    steps = [p for name, p in model.named_parameters() if is_step(name)]
    ids = {id(p) for p in steps}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in run.task.param_groups(model)]
    groups = [g for g in groups if g["params"]]
    settings = run.base_identity.get("steps")
    if settings is None:
        return groups
    own = {key: settings[key] for key in ("lr", "momentum") if settings[key] is not None}
    if run.recipe.optimizer != "sgd":
        own.pop("momentum", None)
    return [*groups, {"params": steps, "scales": True, "weight_decay": 0.0, **own}]


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


def seed_everything(seed: int) -> None:
    """Seed torch, and the global RNGs some libraries draw from (timm's mixup uses numpy's)."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) to finish what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
