"""Sweeps: every combination of tasks x methods x bits x seeds, from the command line or a YAML file.

A sweep file (see `configs/`) reproduces one paper table:

    task: cifar10-resnet20          # or tasks: [...]
    recipe: paper
    bits: [1, T, 2, 3, 4]
    seeds: [0, 1, 2]
    methods:                        # each method with its own hyper-parameters
      fp: {}
      parq: {warmup: 200, steepness: 100, anneal_end: 0.75}
    quantizer: lsbq                 # optional: granularity, quantizer, task_args,
                                    # epochs, batch_size, lr, init

`--shard I/N` keeps every N-th run starting at the I-th, so N processes (or GPUs,
or cluster jobs) split one sweep; finished records are skipped, so shards may be rerun.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import yaml

from .errors import QatbenchError, valid_choices
from .harness import RunSpec
from .quant import parse_bits
from .registry import METHODS

FILE_KEYS = ("task", "tasks", "methods", "bits", "seeds", "recipe", "granularity", "quantizer", "task_args",
             "epochs", "batch_size", "lr", "init")


def expand(tasks: list[str], methods: dict[str, dict[str, Any]], bits: list[int | None], seeds: list[int],
           **common: Any) -> list[RunSpec]:
    """One RunSpec per task x method x bits x seed; a full-precision method runs once per seed."""
    specs = []
    for task, (method, method_args), seed in itertools.product(tasks, methods.items(), seeds):
        for b in (bits if METHODS.get(method).quantizes else [None]):
            specs.append(RunSpec(method=method, task=task, bits=b, seed=seed, method_args=method_args, **common))
    return specs


def shared_method_args(methods: list[str], given: dict[str, str]) -> dict[str, dict[str, str]]:
    """`--method-arg`s for a command line with several methods: each method takes the keys it
    declares; a key that none of them declares goes to all (and is rejected there, with the valid keys)."""
    fields = {m: {f.name for f in dataclasses.fields(METHODS.get(m).Config)} for m in methods}
    declared = set().union(*fields.values())
    return {m: {k: v for k, v in given.items() if k in fields[m] or k not in declared} for m in methods}


def load_sweep(path: Path, device: str) -> list[RunSpec]:
    """The runs of a YAML sweep file, on `device` (a property of the machine, not of the file)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise QatbenchError(f"cannot read sweep file {str(path)!r}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise QatbenchError(f"sweep file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise QatbenchError(f"sweep file {str(path)!r} must be a mapping of {', '.join(FILE_KEYS)}")
    for key in spec:
        if key not in FILE_KEYS:
            raise QatbenchError(f"sweep file {str(path)!r}: unknown key {key!r}; {valid_choices(key, FILE_KEYS)}")
    tasks = spec.get("tasks") or [spec["task"]] if ("task" in spec or "tasks" in spec) else []
    methods = spec.get("methods") or {}
    if not tasks or not isinstance(methods, dict) or not methods:
        raise QatbenchError(f"sweep file {str(path)!r} needs 'task' (or 'tasks') and a mapping 'methods'")
    bits = [parse_bits(str(b)) for b in spec.get("bits", [])] or [None]
    common = {key: spec[key] for key in ("recipe", "granularity", "epochs", "batch_size", "lr", "init") if key in spec}
    if "quantizer" in spec:
        common["scheme"] = spec["quantizer"]
    return expand(tasks, {m: dict(args or {}) for m, args in methods.items()}, bits, list(spec.get("seeds", [0])),
                  task_args=dict(spec.get("task_args") or {}), device=device, **common)


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
