"""Sweeps: every combination of tasks x methods x bits x seeds, from the command line or a YAML file.

A sweep file (see `configs/`) reproduces one paper table:

    task: cifar10-resnet20          # or tasks: [...]
    recipe: paper
    bits: [1, T, 2, 3, 4]
    seeds: [0, 1, 2]
    methods:                        # each method with its own hyper-parameters
      fp: {}
      parq: {warmup: 200, steepness: 100, anneal_end: 0.75}
    quantizer: lsbq                 # optional: any run option that RunSpec lets sweeps set
                                    # (granularity, task_args, epochs, lr, threads, ...)

A sweep file is untrusted input with one schema: the run options are the RunSpec's
typed fields (`qatbench.spec`), so `lr: 1e-2`, `lr: "1e-2"` and `--lr 1e-2` mean the
same, and `lr: nan` is refused everywhere; lists must be lists, a key given twice is an
error, and every error is one line naming the file, the key and the bad value.

`--shard I/N` keeps every N-th run starting at the I-th, so N processes (or GPUs, or
cluster jobs) split one sweep; finished records are skipped and running ones are
locked, so shards and whole sweeps may overlap.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import yaml

from .errors import QatbenchError, valid_choices
from .quant import parse_bits
from .params import build_config
from .registry import METHODS, TASKS
from .options import sweep_keys
from .spec import RunSpec, make_spec

LIST_KEYS = ("tasks", "bits", "seeds")


def file_keys(spec_cls: type = RunSpec) -> tuple[str, ...]:
    """Every key a sweep file may hold: the axes, and the run options whose fields say sweeps may set them."""
    return ("task", *LIST_KEYS, "methods", *sweep_keys(spec_cls))


def expand(tasks: list[str], methods: dict[str, dict[str, Any]], bits: list[int | None], seeds: list[Any],
           owner: str = "command line", spec_cls: type = RunSpec, **common: Any) -> list[RunSpec]:
    """One RunSpec per task x method x bits x seed; a full-precision method runs once per seed.
    Every value is checked and coerced by the RunSpec's schema (errors name `owner`); a task, bit width or seed
    listed twice is an error (it would train one run and count it twice)."""
    specs = []
    for task, (method, method_args), seed in itertools.product(tasks, methods.items(), seeds):
        for b in (bits if METHODS.get(method).quantizes else [None]):
            values = {"method": method, "task": task, "bits": b, "seed": seed, "method_args": method_args, **common}
            specs.append(make_spec(values, owner, cls=spec_cls))
    axes = [(s.task, s.method, s.bits, s.seed) for s in specs]
    for (task, method, b, seed), count in collections.Counter(axes).items():
        if count > 1:
            raise QatbenchError(f"{owner}: {task} {method} bits {b} seed {seed} is listed {count} times (a task, bit "
                                "width or seed given twice); each run trains once")
    return specs


def shared_method_args(methods: list[str], given: dict[str, str]) -> dict[str, dict[str, str]]:
    """`--method-arg`s for a command line with several methods: each method takes the keys it
    declares; a key that none of them declares goes to all (and is rejected there, with the valid keys)."""
    fields = {m: {f.name for f in dataclasses.fields(METHODS.get(m).Config)} for m in methods}
    declared = set().union(*fields.values())
    return {m: {k: v for k, v in given.items() if k in fields[m] or k not in declared} for m in methods}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a single value, not {key!r}",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise QatbenchError(f"cannot read sweep file {str(path)!r}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise QatbenchError(f"sweep file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        message = " ".join(str(err).split())
        raise QatbenchError(f"sweep file {str(path)!r} is not valid YAML: {message}") from None
    if not isinstance(data, dict):
        raise QatbenchError(f"sweep file {str(path)!r} must be a mapping of {', '.join(keys)}")
    return data


def _names(owner: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise QatbenchError(f"{owner}: {key} must be a non-empty list of names, e.g. {key}: [a, b]; got {value!r}")
    return value


def _list(owner: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise QatbenchError(f"{owner}: {key} must be a non-empty list, e.g. {key}: [0, 1]; got {value!r}")
    return value


def _bits(owner: str, values: list[Any]) -> list[int]:
    bits = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise QatbenchError(f"{owner}: bits entry {value!r} is not a bit width (1..8 or T)")
        try:
            bits.append(parse_bits(str(value)))
        except QatbenchError as err:
            raise QatbenchError(f"{owner}: bits: {err}") from None
    return bits


def load_sweep(path: Path, device: str, spec_cls: type = RunSpec) -> list[RunSpec]:
    """The runs of a YAML sweep file, on `device` (a property of the machine, not of the file)."""
    keys = file_keys(spec_cls)
    data = _read(path, keys)
    owner = f"sweep file {str(path)!r}"
    for key in data:
        if key not in keys:
            raise QatbenchError(f"{owner}: unknown key {key!r}; {valid_choices(str(key), keys)}")
    if ("task" in data) == ("tasks" in data):
        raise QatbenchError(f"{owner} needs 'task' (one name) or 'tasks' (a list), not both or neither")
    tasks = _names(owner, "tasks", data["tasks"]) if "tasks" in data else _names(owner, "task", [data["task"]])
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise QatbenchError(f"{owner} needs 'methods', a mapping of method name to its arguments, "
                            "e.g. methods: {ste: {}}")
    for name, args in methods.items():
        if args is not None and not isinstance(args, dict):
            raise QatbenchError(f"{owner}: methods.{name} must be a mapping of its arguments, got {args!r}")
        build_config(METHODS.get(name).Config, args or {}, f"{owner}: methods.{name}")
    for task in tasks:
        build_config(TASKS.get(task).Config, data.get("task_args") or {}, f"{owner}: task_args ({task})")
    bits = _bits(owner, _list(owner, "bits", data["bits"])) if "bits" in data else [None]
    seeds = _list(owner, "seeds", data["seeds"]) if "seeds" in data else [0]
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise QatbenchError(f"{owner}: seeds entry {seed!r} is not an integer")
    options = sweep_keys(spec_cls)
    common = {options[k]: v for k, v in data.items() if k in options}
    return expand(tasks, {m: dict(a or {}) for m, a in methods.items()}, bits, seeds, owner=owner,
                  spec_cls=spec_cls, device=device, **common)


def shard(specs: list[RunSpec], text: str) -> list[RunSpec]:
    """The `I/N` shard of `specs`: every N-th run, starting at the I-th (0-based)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise QatbenchError(f"invalid --shard {text!r}; write I/N with 0 <= I < N, e.g. 0/4")
    return specs[i::n]
