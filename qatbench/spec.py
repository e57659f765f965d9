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
from .options import identity_fields, identity_values, option
from .params import build_config
from .quant import MAX_BITS, QuantizerConfig, bits_label
from .registry import METHODS, TASKS
from .results import identity_hash
from .task import Recipe, Task

FP_DIAGNOSTIC_BITS = 2  # levels a full-precision run's transition diagnostics are measured against
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class IdentityContext:
    """What the effective value of an option in a run's identity may depend on."""

    device_type: str
    recipe: Recipe


def _effective_precision(value: str, context: IdentityContext) -> str:
    """auto: the recipe's choice on CUDA, fp32 on the CPU."""
    if value != "auto":
        return value
    return context.recipe.cuda_precision if context.device_type == "cuda" else "fp32"


def _on_cuda(value: bool, context: IdentityContext) -> bool:
    return value and context.device_type == "cuda"


def _on_cpu(value: int, context: IdentityContext) -> int | None:
    return value if context.device_type == "cpu" else None


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What the user asked for; `resolve` fills in every default. Built by `make_spec` from the command
    line or a sweep file, every field coerced and range-checked by its annotation. Each field declares its
    flag, its sweep-file key and its part in the identity (`qatbench.options`); method, task, bits and seed
    are the axes that `qatbench run` and sweep files take as lists, and method, task, recipe, quantizer and
    init enter the identity resolved (their configurations, the checkpoint's content)."""

    method: str = option("", "method name (`qatbench list methods`)")
    task: str = option("", "task name (`qatbench list tasks`)")
    bits: int | None = option(None, "bit width, 0 for ternary; None for a full-precision method", ge=0, le=MAX_BITS)
    seed: int = option(0, "random seed", ge=0, le=MAX_SEED)
    recipe: str = option("paper", "smoke | short | paper", flag="--recipe", sweep=True)
    method_args: dict[str, Any] = option({}, "a method hyper-parameter, e.g. anneal_end=0.75", flag="--method-arg")
    task_args: dict[str, Any] = option({}, "a task option, e.g. hidden=64", flag="--task-arg", sweep=True)
    scheme: str | None = option(None, "level set: uniform | lsbq (default: the task's)", flag="--quantizer",
                                sweep=True, key="quantizer")
    granularity: str | None = option(None, "channel | tensor (default: the task's)", flag="--granularity", sweep=True)
    epochs: int | None = option(None, "override the recipe's epochs (0: no training, e.g. rtn from --init)",
                                flag="--epochs", sweep=True, ge=0)
    batch_size: int | None = option(None, "override the recipe's batch size", flag="--batch-size", sweep=True, ge=1)
    lr: float | None = option(None, "override the recipe's learning rate", flag="--lr", sweep=True, gt=0)
    device: str = option("cpu", "cpu | cuda | cuda:N", flag="--device")  # the machine's, never a sweep file's
    init: str | None = option(None, "start from these weights: a run's export (<record>.safetensors, e.g. of a "
                                    "--method fp run of the task) or a state dict saved with torch.save",
                              flag="--init", sweep=True, metavar="CHECKPOINT")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "auto (the recipe's choice on CUDA, fp32 on the CPU) | fp32 | bf16 (autocast; evaluation stays "
                "fp32)", flag="--precision", sweep=True, identity=_effective_precision)
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = option(
        "none", "torch.compile the model: default | reduce-overhead (CUDA graphs) | max-autotune",
        flag="--compile", sweep=True, identity=True, const="default", metavar="MODE")
    channels_last: bool = option(False, "conv weights and image batches in NHWC memory order",
                                 flag="--channels-last", sweep=True, identity=True)
    tf32: bool = option(True, "on CUDA, full fp32 matrix multiplies and deterministic convolution algorithms "
                              "instead of TF32 and cudnn.benchmark's", flag="--no-tf32", sweep=True,
                        identity=_on_cuda)
    threads: int = option(1, "on the CPU, the threads of torch's intra-op pool: they decide the order of float "
                             "sums, so they are part of the identity", flag="--threads", sweep=True,
                          identity=_on_cpu, omit_default=True, ge=1, metavar="N")
    micro_batch: int | None = option(
        None, "gradient accumulation: forward and backward N samples at a time on each process; the recipe's "
              "batch stays the step's batch", flag="--micro-batch", sweep=True, identity=True, omit_default=True, ge=1,
        metavar="N")
    fsdp: bool = option(False, "on several processes: shard parameters, gradients and optimizer state over them "
                               "(FSDP2; tasks with shard units: llama-*) instead of replicating them (DDP)",
                        flag="--fsdp", sweep=True, identity=True, omit_default=True)
    processes: int = option(1, "processes that train the run together (DDP, FSDP): set from --nproc, torchrun or "
                               "--gpus-per-run", identity=True, omit_default=True, ge=1)
    act_bits: int | None = option(None, "quantize the input of every quantized layer to A bits too (per tensor, on a "
                                        "learned step; none: weights only)", flag="--act-bits", sweep=True, ge=1,
                                  le=MAX_BITS, metavar="A")
    scale: Literal["estimated", "learned"] = option(
        "estimated", "the weights' quantization steps: estimated from the weights, or learned (LSQ)", flag="--scale",
        sweep=True)
    scale_init: Literal["method", "lsq", "3std"] = option(
        "method", "where learned steps start: LSQ's 2 mean|x| / sqrt(Q_P), TALR's 3 std(x) (method: the method's "
                  "choice)", flag="--scale-init", sweep=True)
    scale_lr: float | None = option(None, "learning rate of the learned steps (none: the method's, TALR 0.01; else the "
                                          "recipe's)", flag="--scale-lr", sweep=True, gt=0)


def make_spec(values: dict[str, Any], owner: str, noun: str = "option", cls: type = RunSpec) -> RunSpec:
    """A RunSpec (or `cls`, a subclass with more options) from raw values (strings from the command line, any
    YAML scalar from a sweep file)."""
    return build_config(cls, values, owner, noun)


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
    def act_bits(self) -> int | None:
        """The activations' bit width (None: weights only)."""
        return self.task.act_bits

    @property
    def identity_activations(self) -> dict[str, Any]:
        """What the identity says of the quantized activations: bits, form, where steps start, trained or not."""
        return self.base_identity["activations"]

    @property
    def label(self) -> str:
        activations = f"a{self.act_bits}" if self.act_bits else ""
        return f"{self.task.name} {self.method_cls.name} b{self.bits_text}{activations} s{self.spec.seed}"


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
    spec = make_spec(dataclasses.asdict(spec), "run", cls=type(spec))  # the same checks, however it was built
    method_cls = METHODS.get(spec.method)
    task_cls = TASKS.get(spec.task)
    method_config = build_config(method_cls.Config, spec.method_args, f"method {spec.method!r}")
    task, recipe = _task_and_recipe(spec, task_cls)
    if method_cls.quantizes and spec.bits is None:
        raise QatbenchError(f"method {spec.method!r} quantizes: give --bits (1..8 or T)")
    default_scheme = "uniform" if spec.scale == "learned" else task.default_scheme  # LSQ's grid is uniform
    scheme = check_choice("quantizer scheme", spec.scheme or default_scheme, ("uniform", "lsbq"))
    granularity = check_choice("granularity", spec.granularity or task.default_granularity, ("channel", "tensor"))
    bits = spec.bits if method_cls.quantizes else FP_DIAGNOSTIC_BITS
    scale = spec.scale if method_cls.quantizes else "estimated"
    if scale not in method_cls.step_sizes:
        able = [name for name in METHODS.names() if "learned" in METHODS.get(name).step_sizes]
        raise QatbenchError(f"method {spec.method!r} cannot learn its steps (--scale learned): its levels come from "
                            f"its own quantizer, estimated from the weights; methods that learn them: {', '.join(able)}")
    step_init = method_cls.default_scale_init if spec.scale_init == "method" else spec.scale_init
    quantizer = QuantizerConfig(bits=bits, scheme=scheme, granularity=granularity, scale=scale, step_init=step_init)
    task.act_bits = spec.act_bits if method_cls.quantizes else None  # the full-precision baseline stays so
    if spec.fsdp:
        _check_shardable(method_cls, task, granularity, spec.compile, spec.processes)
        if task.act_bits or scale == "learned":
            raise QatbenchError("--fsdp with --act-bits or --scale learned is not supported yet")
    device = resolve_device(spec.device)
    init = _checkpoint_identity(spec.init) if spec.init else None
    identity = {
        "method": method_cls.name,
        "method_config": dataclasses.asdict(method_config),
        "task": task_cls.name,
        "task_config": dataclasses.asdict(task.config),
        "recipe": spec.recipe,
        "recipe_config": dataclasses.asdict(recipe),
        "quantizer": quantizer.identity(),
        "seed": spec.seed,
        "device_type": device.type,
        "init": init,
        **identity_values(spec, IdentityContext(device.type, recipe)),
        **_learned_steps(spec, method_cls, task, scale),
    }
    return ResolvedRun(spec, method_cls, method_config, task, recipe, quantizer, device, identity)


def _learned_steps(spec: RunSpec, method_cls: type[Method], task: Task, scale: str) -> dict[str, Any]:
    """The identity's account of quantized activations (`activations`: bits, the quantizer's form, where its step
    starts, whether it is trained or calibrated after training) and of learned steps (`steps`: their learning rate
    and momentum, None: the recipe's; whether the weights' steps are learned, frozen or estimated), present only
    where a run has them. TALR's unscaled form of LSQ needs a normalization after each layer to absorb the scale it
    leaves out: on a task without one the activations take LSQ's form."""
    act_bits = task.act_bits
    if not act_bits and scale != "learned":
        return {}
    init = method_cls.default_scale_init if spec.scale_init == "method" else spec.scale_init
    steps = {"lr": spec.scale_lr or method_cls.default_scale_lr, "momentum": method_cls.scale_momentum,
             "weights": "learned" if scale == "learned" and not method_cls.freezes_weight_steps else
             "frozen" if scale == "learned" else "estimated"}
    form = method_cls.activation_form if method_cls.activation_form != "talr" or task.normalized_layers else "lsq"
    activations = {"activations": {"bits": act_bits, "form": form, "init": init,
                                   "trained": method_cls.trains_activation_steps}} if act_bits else {}
    return {**activations, "steps": steps}


def _task_and_recipe(spec: RunSpec, task_cls: type[Task]) -> tuple[Task, Recipe]:
    """The task built from its options, and its recipe with the run's overrides."""
    task = task_cls(build_config(task_cls.Config, spec.task_args, f"task {spec.task!r}"))
    check_choice("recipe", spec.recipe, task.recipes)
    return task, task.recipes[spec.recipe].with_overrides(spec.epochs, spec.batch_size, spec.lr)


def _check_shardable(method_cls: type[Method], task: Task, granularity: str, compile_mode: str,
                     processes: int) -> None:
    """`--fsdp` needs several processes, a task that names its shard units and a method that trains shards at
    this granularity; torch.compile of a sharded model is not tried yet."""
    if compile_mode != "none":
        raise QatbenchError(f"--fsdp with --compile {compile_mode} is not supported yet; valid choice: --compile none")
    if type(task).shard_units is Task.shard_units:
        shardable = [name for name in TASKS.names() if TASKS.get(name).shard_units is not Task.shard_units]
        raise QatbenchError(f"--fsdp: task {task.name!r} cannot be sharded; tasks that can: {', '.join(shardable)}")
    if granularity not in method_cls.sharded_granularities:
        able = [name for name in METHODS.names() if granularity in METHODS.get(name).sharded_granularities]
        raise QatbenchError(f"--fsdp: method {method_cls.name!r} cannot train sharded parameters with "
                            f"{granularity} granularity; methods that can: {', '.join(able)}")
    if processes < 2:
        raise QatbenchError("--fsdp shards a run over its processes: start it on several (--nproc N, torchrun, or "
                            "--gpus-per-run N in a sweep)")


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
"""What every recorded identity holds (the options added since, such as `threads`, only in newer ones)."""


def _plugin(registry: Any, name: Any) -> Any:
    """`registry.get(name)`, saying how to load a plugin when the name is unknown."""
    try:
        return registry.get(name)
    except QatbenchError as err:
        raise QatbenchError(f"{err} (a plugin's {registry.kind}? pass --plugin FILE.py that defines it)") from None


def _check_identity(identity: Any) -> dict[str, Any]:
    missing = [k for k in IDENTITY_KEYS if not isinstance(identity, dict) or k not in identity]
    if missing:
        raise QatbenchError(f"not a run identity (it lacks {', '.join(missing)})")
    return identity


def _recorded_spec(identity: Any, device: str, quantizes: bool) -> RunSpec:
    """The RunSpec that a recorded identity describes, every value checked by the schema. An option the
    identity holds as its effective value None (the CPU threads of a CUDA run) is rebuilt with its default."""
    quantizer, recipe = identity["quantizer"], identity["recipe_config"]
    if not isinstance(quantizer, dict) or not isinstance(recipe, dict):
        raise QatbenchError("not a run identity (its quantizer or recipe is not a mapping)")
    options = {k: identity[k] for k in identity_fields(RunSpec) if identity.get(k) is not None}
    return make_spec({**options, "method": identity["method"], "task": identity["task"], "seed": identity["seed"],
                      "bits": quantizer.get("bits") if quantizes else None, "recipe": identity["recipe"],
                      "method_args": identity["method_config"], "task_args": identity["task_config"],
                      "scheme": quantizer.get("scheme"), "granularity": quantizer.get("granularity"),
                      "scale": quantizer.get("scale", "estimated"),
                      "act_bits": (identity.get("activations") or {}).get("bits"),
                      "scale_init": quantizer.get("step_init") or (identity.get("activations") or {}).get("init")
                      or "method",
                      "scale_lr": (identity.get("steps") or {}).get("lr"),
                      "epochs": recipe.get("epochs"), "batch_size": recipe.get("batch_size"), "lr": recipe.get("lr"),
                      "device": device}, "recorded run")


def _check_recorded(identity: dict[str, Any], rebuilt: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if json.loads(json.dumps(rebuilt[key])) != identity[key]:  # as JSON holds it: tuples are lists
            raise QatbenchError(f"the recorded run's {key} is not what this qatbench resolves it to "
                                f"({identity[key]!r} vs {rebuilt[key]!r}): the code has changed since")


def resolve_identity(identity: Any, device: str = "cpu") -> ResolvedRun:
    """The run that a record's or an export's identity describes, rebuilt through the registries (no `--init`:
    what is rebuilt loads its weights from the run's checkpoint or export). The identity is untrusted: every
    value goes through the RunSpec schema, and the rebuilt recipe and configurations must be the recorded ones.
    What describes where it ran (device type, the CPU threads, TF32, processes, ...) is kept as recorded, and an
    option the identity lacks (at its default, or recorded before the option existed) is left out, so that the
    rebuilt identity hashes to the run's id."""
    method_cls = _plugin(METHODS, _check_identity(identity)["method"])
    run = resolve(_recorded_spec(identity, device, method_cls.quantizes))
    _check_recorded(identity, run.base_identity, ("method_config", "task_config", "recipe_config", "quantizer",
                                                  "precision", *(k for k in ("activations", "steps") if k in identity)))
    run.base_identity.update(device_type=identity.get("device_type"), init=identity.get("init"))
    for key in identity_fields(RunSpec):
        if key in identity:
            run.base_identity[key] = identity[key]
        else:
            run.base_identity.pop(key, None)
    return run


def resolve_task(identity: Any, device: str = "cpu") -> tuple[Task, Recipe, RunSpec]:
    """The task, its recipe and the options of the run that a recorded identity describes, without its method
    (which evaluating the run's exported weights does not need: a plugin method's export evaluates without it)."""
    spec = _recorded_spec(_check_identity(identity), device, quantizes=False)
    task, recipe = _task_and_recipe(spec, _plugin(TASKS, spec.task))
    task.act_bits = spec.act_bits
    _check_recorded(identity, {"task_config": dataclasses.asdict(task.config),
                               "recipe_config": dataclasses.asdict(recipe)}, ("task_config", "recipe_config"))
    return task, recipe, spec
