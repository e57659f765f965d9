"""What a run is: the user's RunSpec, validated and resolved into a ResolvedRun with an identity.

One schema serves the command line and sweep files: every RunSpec field is typed and
ranged (`qatbench.params`), so `epochs: "3"` and `--epochs 3` coerce alike and
`lr: nan` is refused alike. A run's identity is the SHA-256 of its fully resolved
spec: method and task configuration, recipe, quantizer, seed, device type, speed
options, the `--init` checkpoint's content and the data's fingerprint. Two runs with
the same identity are the same experiment; one whose record exists is not rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch

from .data import DataSource
from .errors import QatbenchError, check_choice
from .fingerprint import Fingerprint, fingerprint
from .method import Method
from .params import build_config, param
from .quant import MAX_BITS, QuantizerConfig, bits_label
from .registry import METHODS, TASKS
from .results import identity_hash
from .task import Recipe, Task

FP_DIAGNOSTIC_BITS = 2  # levels a full-precision run's transition diagnostics are measured against
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What the user asked for; `resolve` fills in every default. Built by `make_spec` from the command
    line or a sweep file, every field coerced and range-checked by its annotation."""

    method: str = param("", "method name (`qatbench list methods`)")
    task: str = param("", "task name (`qatbench list tasks`)")
    bits: int | None = param(None, "bit width, 0 for ternary; None for a full-precision method", ge=0, le=MAX_BITS)
    seed: int = param(0, "random seed", ge=0, le=MAX_SEED)
    recipe: str = param("paper", "smoke | short | paper")
    method_args: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "method options"})
    task_args: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "task options"})
    scheme: str | None = param(None, "level set: uniform | lsbq (None: the task's)")
    granularity: str | None = param(None, "channel | tensor (None: the task's)")
    epochs: int | None = param(None, "override the recipe's epochs (0: no training, e.g. rtn from --init)", ge=0)
    batch_size: int | None = param(None, "override the recipe's batch size", ge=1)
    lr: float | None = param(None, "override the recipe's learning rate", gt=0)
    device: str = param("cpu", "cpu | cuda | cuda:N")
    init: str | None = param(None, "a full-precision checkpoint (state dict) to start from")
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto", "auto (the recipe's choice for the device) | fp32 | bf16 (autocast; evaluation stays fp32)")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = param(
        "none", "torch.compile mode of the model")
    channels_last: bool = param(False, "conv weights and image batches in NHWC memory order")
    micro_batch: int | None = param(
        None, "samples per forward on each process, the recipe's batch accumulated over them (None: the whole "
              "batch); not part of the identity: the same gradient up to float reassociation, except for "
              "BatchNorm, whose statistics are a micro-batch's", ge=1)
    fsdp: bool = param(False, "on several processes: shard parameters, gradients and optimizer state over them "
                              "(FSDP2; tasks with shard units: llama-*); not part of the identity: the same training "
                              "up to float reassociation")
    tf32: bool = param(True, "on CUDA: TF32 for fp32 matrix multiplies and convolutions, cudnn.benchmark "
                             "(False: full fp32 and deterministic convolution algorithms)")


def make_spec(values: dict[str, Any], owner: str, noun: str = "option") -> RunSpec:
    """A RunSpec from raw values (strings from the command line, any YAML scalar from a sweep file)."""
    return build_config(RunSpec, values, owner, noun)


@dataclasses.dataclass
class ResolvedRun:
    """A RunSpec with its plugins looked up and validated; its identity once its data is bound."""

    spec: RunSpec
    method_cls: type[Method]
    method_config: Any
    task: Task
    recipe: Recipe
    quantizer: QuantizerConfig  # for a full-precision method: the levels of its diagnostics only
    device: torch.device
    base_identity: dict[str, Any]  # everything but the data
    data: DataSource | None = None
    data_fingerprint: Fingerprint | None = None

    @property
    def identity(self) -> dict[str, Any]:
        if self.data_fingerprint is None:
            raise QatbenchError(f"{self.label}: its data has not been located, so it has no identity yet")
        return {**self.base_identity, "data": self.data_fingerprint.fingerprint}

    @property
    def run_id(self) -> str:
        return identity_hash(self.identity)

    @property
    def precision(self) -> str:
        """The resolved precision: fp32 or bf16."""
        return self.base_identity["precision"]

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
    """A device that exists here, or a one-line error."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise QatbenchError(f"invalid device {text!r}; valid choices: cpu, cuda, cuda:N") from None
    check_choice("device type", device.type, ("cpu", "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QatbenchError(f"device {text!r} requested but no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise QatbenchError(f"device {text!r} does not exist; valid choices: "
                                + ", ".join(f"cuda:{i}" for i in range(count)))
    return device


def resolve(spec: RunSpec) -> ResolvedRun:
    """Look up and validate everything a run needs, before any data is read or training starts."""
    spec = make_spec(dataclasses.asdict(spec), "run")  # the same checks, however the spec was built
    method_cls = METHODS.get(spec.method)
    task_cls = TASKS.get(spec.task)
    method_config = build_config(method_cls.Config, spec.method_args, f"method {spec.method!r}")
    task = task_cls(build_config(task_cls.Config, spec.task_args, f"task {spec.task!r}"))
    check_choice("recipe", spec.recipe, task.recipes)
    recipe = task.recipes[spec.recipe].with_overrides(spec.epochs, spec.batch_size, spec.lr)
    if method_cls.quantizes and spec.bits is None:
        raise QatbenchError(f"method {spec.method!r} quantizes: give --bits (1..8 or T)")
    scheme = check_choice("quantizer scheme", spec.scheme or task.default_scheme, ("uniform", "lsbq"))
    granularity = check_choice("granularity", spec.granularity or task.default_granularity, ("channel", "tensor"))
    bits = spec.bits if method_cls.quantizes else FP_DIAGNOSTIC_BITS
    quantizer = QuantizerConfig(bits=bits, scheme=scheme, granularity=granularity)
    if spec.fsdp:
        _check_shardable(method_cls, task, granularity, spec.compile)
    device = resolve_device(spec.device)
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
        "tf32": spec.tf32 and device.type == "cuda",
    }
    return ResolvedRun(spec, method_cls, method_config, task, recipe, quantizer, device, identity)


def _check_shardable(method_cls: type[Method], task: Task, granularity: str, compile_mode: str) -> None:
    """`--fsdp` needs a task that names its shard units and a method that trains shards at this granularity;
    torch.compile of a sharded model is not tried yet."""
    if compile_mode != "none":
        raise QatbenchError(f"--fsdp with --compile {compile_mode} is not supported yet; valid choice: --compile none")
    if type(task).shard_units is Task.shard_units:
        shardable = [name for name in TASKS.names() if TASKS.get(name).shard_units is not Task.shard_units]
        raise QatbenchError(f"--fsdp: task {task.name!r} cannot be sharded; tasks that can: {', '.join(shardable)}")
    if granularity not in method_cls.sharded_granularities:
        able = [name for name in METHODS.names() if granularity in METHODS.get(name).sharded_granularities]
        raise QatbenchError(f"--fsdp: method {method_cls.name!r} cannot train sharded parameters with "
                            f"{granularity} granularity; methods that can: {', '.join(able)}")


def bind_data(runs: list[ResolvedRun], data_root: Path | None, download: bool) -> list[ResolvedRun]:
    """Locate and fingerprint every run's data (once per task class and data set), which completes its identity."""
    located: dict[type, DataSource] = {}
    fingerprints: dict[tuple[str, Path], Fingerprint] = {}
    for run in runs:
        if type(run.task) not in located:
            located[type(run.task)] = run.task.locate_data(data_root, download)
        source = located[type(run.task)]
        key = (source.dataset, source.root)
        if key not in fingerprints:
            fingerprints[key] = fingerprint(source.root, source.files)
        run.data, run.data_fingerprint = source, fingerprints[key]
    return runs


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


IDENTITY_KEYS = ("method", "method_config", "task", "task_config", "recipe", "recipe_config", "quantizer", "seed",
                 "precision", "compile", "channels_last", "data")


def resolve_identity(identity: Any, device: str = "cpu") -> ResolvedRun:
    """The run that a record's or an export's identity describes, rebuilt through the registries (no `--init`:
    what is rebuilt loads its weights from the run's checkpoint or export). The identity is untrusted: every
    value goes through the RunSpec schema, and the rebuilt recipe and configurations must be the recorded ones."""
    missing = [k for k in IDENTITY_KEYS if not isinstance(identity, dict) or k not in identity]
    if missing:
        raise QatbenchError(f"not a run identity (it lacks {', '.join(missing)})")
    quantizer, recipe = identity["quantizer"], identity["recipe_config"]
    if not isinstance(quantizer, dict) or not isinstance(recipe, dict):
        raise QatbenchError("not a run identity (its quantizer or recipe is not a mapping)")
    method_cls = METHODS.get(identity["method"])
    spec = make_spec({"method": identity["method"], "task": identity["task"], "seed": identity["seed"],
                      "bits": quantizer.get("bits") if method_cls.quantizes else None, "recipe": identity["recipe"],
                      "method_args": identity["method_config"], "task_args": identity["task_config"],
                      "scheme": quantizer.get("scheme"), "granularity": quantizer.get("granularity"),
                      "epochs": recipe.get("epochs"), "batch_size": recipe.get("batch_size"), "lr": recipe.get("lr"),
                      "device": device, "precision": identity["precision"], "compile": identity["compile"],
                      "channels_last": identity["channels_last"],
                      "tf32": identity.get("tf32", False)}, "recorded run")
    run = resolve(spec)
    for key in ("method_config", "task_config", "recipe_config", "quantizer", "precision"):
        if json.loads(json.dumps(run.base_identity[key])) != identity[key]:  # as JSON holds it: tuples are lists
            raise QatbenchError(f"the recorded run's {key} is not what this qatbench resolves it to "
                                f"({identity[key]!r} vs {run.base_identity[key]!r}): the code has changed since")
    # where it ran: a CUDA run rebuilt on the CPU keeps its recorded device type and TF32 setting (and a
    # record from before the TF32 setting existed has none), so the rebuilt identity hashes to its run id
    run.base_identity.update(device_type=identity.get("device_type"), init=identity.get("init"))
    if "tf32" in identity:
        run.base_identity["tf32"] = identity["tf32"]
    else:
        del run.base_identity["tf32"]
    return run
