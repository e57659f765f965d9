"""Options declared once: the flags, the sweep-file keys, the identity and the records all come from one field.

A run's options (`qatbench.spec.RunSpec`) and how runs are executed (`Settings`) are dataclass
fields made with `option(default, help, ...)`, which declares everything about an option in one
place: its type (the annotation, coerced and checked by `qatbench.params`), default, numeric
range, one-line help, its command-line flag, whether a sweep file may set it (and under which
key), and whether it enters the run's identity (as given, or as the effective value of the run:
`tf32` counts only on CUDA, the CPU thread count only on the CPU). Everything else is derived:

- `add_flags(parser, cls)` adds each option's flag to a command's parser;
- `given(args, cls)` reads back the flags the user gave (None where not given);
- `sweep_keys(cls)` maps each key a sweep file may use to its field;
- `identity_values(spec, context)` is each identity option's part of a run's identity.

So a new option is one field; `tests/test_options.py` adds one and sees it in `--help`, in a
sweep file and in the identity.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .params import coerce, param, parse_assignments

IdentityRule = Callable[[Any, Any], Any]  # (value, context) -> the value the identity holds


def option(default: Any, help: str, *, flag: str | None = None, sweep: bool = False,
           identity: bool | IdentityRule = False, omit_default: bool = False, key: str | None = None,
           const: Any = None, metavar: str | None = None, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field that declares one option.

    `flag`: its command-line spelling (a bool that defaults to True is switched off by its flag, e.g.
    `--no-tf32`; a dict is given as repeated `KEY=VALUE`); None: not on the command line.
    `sweep`: a sweep file may set it, under `key` (default: the field's name).
    `identity`: it enters the run's identity, as given (True) or as `identity(value, context)` returns;
    with `omit_default`, only when that value is neither None nor the default's (so that adding an option
    leaves the identities of the runs that do not use it as they were).
    `const`: the value of the flag given without one (`--compile` alone means `default`)."""
    metadata = {**param(default, help, ge=ge, gt=gt, le=le, lt=lt).metadata, "flag": flag, "sweep": sweep,
                "identity": identity, "omit_default": omit_default, "key": key, "const": const,
                "metavar": metavar}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """Add the flag of every option of `cls` that has one (of the fields named in `only`, when given). Each
    flag's value is kept as given (text); `given` returns the flags the user gave, for the schema to coerce."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls):
        flag = f.metadata["flag"]
        if flag is None or only is not None and f.name not in only:
            continue
        default = _default(f)
        help_text = f.metadata["help"]
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_const", const=not default, default=None,
                                help=help_text)
        elif isinstance(default, dict):
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="KEY=VALUE",
                                help=f"{help_text} (repeatable)")
        elif isinstance(default, (tuple, list)):
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, metavar=f.metadata["metavar"] or "VALUE",
                                help=help_text)
        else:
            shown = f" (default: {default})" if default not in (None, "") else ""
            extra = {"nargs": "?", "const": f.metadata["const"]} if f.metadata["const"] is not None else {}
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.metadata["metavar"] or f.name.upper(),
                                help=help_text + shown, **extra)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `cls` given on the command line, by field name, as given (`KEY=VALUE` lists parsed)."""
    values = {}
    for f in _fields(cls):
        flag = f.metadata["flag"]
        value = getattr(args, f.name, None)
        if flag is None or value is None:
            continue
        values[f.name] = parse_assignments(value, flag) if isinstance(_default(f), dict) else value
    return values


def sweep_keys(cls: type) -> dict[str, str]:
    """{key a sweep file may use: the field it sets}."""
    return {f.metadata["key"] or f.name: f.name for f in _fields(cls) if f.metadata["sweep"]}


def identity_fields(cls: type) -> list[str]:
    """The fields that enter a run's identity through `identity_values` (by their own names)."""
    return [f.name for f in _fields(cls) if f.metadata["identity"]]


def identity_values(spec: Any, context: Any) -> dict[str, Any]:
    """{field: the value the run's identity holds} for every identity option of `spec` (an `omit_default` option
    only where it holds something other than None and its default)."""
    values = {}
    for f in _fields(type(spec)):
        rule = f.metadata["identity"]
        if not rule:
            continue
        value = getattr(spec, f.name)
        value = rule(value, context) if callable(rule) else value
        if f.metadata["omit_default"] and (value is None or value == _default(f)):
            continue
        values[f.name] = value
    return values


@dataclasses.dataclass(frozen=True)
class Settings:
    """How runs are executed: where their files go, when they checkpoint, what they log. None of it changes a
    run's result, so none of it is in a run's identity. Picklable (it travels to pool workers and SLURM jobs)."""

    out: Path = option(Path("runs"), "folder of run records", flag="--out")
    data_root: Path | None = option(None, "where the data set lies (the only place searched when given)",
                                    flag="--data-root", metavar="DIR")
    download: bool = option(True, "never try to download a missing data set", flag="--no-download")
    force: bool = option(False, "rerun runs whose record already exists", flag="--force")
    checkpoint_minutes: float = option(10.0, "checkpoint inside an epoch at most every M minutes (every epoch's end "
                                             "regardless; 0: after every step)", flag="--checkpoint-minutes",
                                       metavar="M", ge=0)
    keep_checkpoints: bool = option(False, "keep each run's last checkpoint after its record is written",
                                    flag="--keep-checkpoints")
    stale_lock_hours: float = option(24.0, "report run locks of other hosts untouched for H hours",
                                     flag="--stale-lock-hours", metavar="H", ge=0)
    logs: tuple[str, ...] = option((), "per-step logs beside each record: csv (<record>.steps.csv), tensorboard "
                                       "(<record>.tb/)", flag="--log", metavar="KIND")
    progress_seconds: float = option(30.0, "without a terminal, a progress line every S seconds (0: none)",
                                     flag="--progress-seconds", metavar="S", ge=0)
    command: str | None = option(None, "the command line that started the runs (kept in each record)")
    plugins: tuple[str, ...] = option((), "plugin files, loaded again in every worker process")

    @property
    def stale_lock_s(self) -> float:
        return 3600 * self.stale_lock_hours


def make_settings(values: dict[str, Any], owner: str = "command line") -> Settings:
    """Settings from raw values (flags as text), each coerced and checked by its field."""
    hints = typing.get_type_hints(Settings)
    kwargs = {}
    for f in dataclasses.fields(Settings):
        if f.name not in values:
            continue
        value, annotation = values[f.name], hints[f.name]
        if annotation in (Path, Path | None):
            kwargs[f.name] = None if value is None else Path(value)
        elif typing.get_origin(annotation) is tuple:
            kwargs[f.name] = tuple(str(v) for v in value)
        else:
            kwargs[f.name] = coerce(owner, f.metadata["flag"] or f.name, annotation, value, f.metadata["bounds"])
    return Settings(**kwargs)

