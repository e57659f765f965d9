"""Hyper-parameters as typed dataclasses (the torchao `AOBaseConfig` pattern).

A method or task declares its knobs as dataclass fields made with `param(default,
help, ge=..., gt=..., le=..., lt=...)`. `build_config` validates values against those
fields and coerces them by their annotations, so the CLI, sweep files, the records and
`qatbench list` all read one schema. The same coercion (`coerce`) serves every typed
value the user gives (run options, sweep-file keys): a string is parsed by the
annotation (`"1e-2"` is a float, `"3"` an int), any other value must already be of
the annotated type (a YAML `true` is no int, a list is no float), numbers must be
finite and inside the declared range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import QatbenchError, valid_choices

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def param(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a default, a one-line description and an optional numeric range."""
    bounds = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds})


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """For plugins without hyper-parameters."""


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`; a key given twice is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise QatbenchError(f"{flag} {item!r} is not of the form key=value")
        if key in out:
            raise QatbenchError(f"{flag} {key!r} is given twice ({out[key]!r} and {value.strip()!r})")
        out[key] = value.strip()
    return out


def _optional_inner(annotation: Any) -> Any | None:
    """`X` for an `X | None` annotation, else None."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(c) for c in typing.get_args(annotation))
    inner = _optional_inner(annotation)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    return getattr(annotation, "__name__", str(annotation))


def coerce(owner: str, name: str, annotation: Any, value: Any, bounds: dict[str, float] | None = None) -> Any:
    """`value` as the annotated type, or a one-line QatbenchError naming `owner`, `name` and the value."""
    inner = _optional_inner(annotation)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(owner, name, inner, value, bounds)

    def bad(what: str) -> QatbenchError:
        return QatbenchError(f"{owner} {name}={value!r} {what}")

    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise QatbenchError(f"{owner} {name}={value!r}: {valid_choices(str(value), [str(c) for c in choices])}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        lowered = value.lower() if isinstance(value, str) else None
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise bad("is not a valid bool (true or false)")
        return lowered in ("true", "1", "yes")
    if annotation is str:
        if not isinstance(value, str):
            raise bad("is not a string")
        return value
    if typing.get_origin(annotation) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("is not a mapping of name: value")
        for key, item in value.items():
            if item is not None and not isinstance(item, (str, int, float, bool)):
                raise QatbenchError(f"{owner} {name}.{key}={item!r} is not a single value")
        return dict(value)
    if annotation in (int, float):
        number = _number(value, annotation)
        if number is None:
            raise bad(f"is not a valid {annotation.__name__}")
        if not math.isfinite(number):
            raise bad("is not a finite number")
        for key, limit in (bounds or {}).items():
            if not {"ge": number >= limit, "gt": number > limit, "le": number <= limit, "lt": number < limit}[key]:
                raise bad(f"must be {_BOUNDS[key]} {limit:g}")
        return number
    raise QatbenchError(f"{owner} {name} has an unsupported type {annotation!r}")


def _number(value: Any, kind: type) -> int | float | None:
    """An int or float from a number or its text in any YAML/Python spelling; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return int(value) if kind is int else float(value)
        except ValueError:
            if kind is int:  # "1e3" is an int only when its float value is whole
                try:
                    as_float = float(value)
                except ValueError:
                    return None
                return int(as_float) if math.isfinite(as_float) and as_float == int(as_float) else None
            return None
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def build_config(config_cls: type, values: dict[str, Any], owner: str, noun: str = "argument") -> Any:
    """Instantiate `config_cls` from `values`, each coerced and range-checked by its field.

    Errors read `unknown <owner> <noun> 'x'` and `<owner> <noun> x=<value> <what is wrong>`."""
    if not isinstance(values, dict):
        raise QatbenchError(f"{owner}: {noun}s must be a mapping of name: value, got {type(values).__name__}")
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            valid = valid_choices(str(key), fields) if fields else "it takes no arguments"
            raise QatbenchError(f"unknown {owner} {noun} {key!r}; {valid}")
        kwargs[key] = coerce(f"{owner} {noun}", key, hints[key], value, fields[key].metadata.get("bounds"))
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise QatbenchError(f"{owner}: {err}") from None


def describe(config_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each hyper-parameter, for `qatbench list`."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        bounds = f.metadata.get("bounds") or {}
        limits = ", ".join(f"{_BOUNDS[k]} {v:g}" for k, v in bounds.items())
        help_text = f.metadata.get("help", "") + (f" ({limits})" if limits else "")
        rows.append((f.name, _type_name(hints[f.name]), f.default, help_text))
    return rows
