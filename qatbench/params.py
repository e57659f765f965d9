"""Hyper-parameters as typed dataclasses (the torchao `AOBaseConfig` pattern).

A method or task declares its knobs as dataclass fields made with `param(default,
help)`. `build_config` validates `key=value` strings against those fields and
coerces them by their annotations, so the CLI, the records and `qatbench list`
all read one schema.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from .errors import QatbenchError, valid_choices


def param(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """For plugins without hyper-parameters."""


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QatbenchError(f"{flag} {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def _coerce(owner: str, name: str, annotation: Any, text: Any) -> Any:
    """Convert `text` to the field's annotated type, or raise a one-line error."""
    if not isinstance(text, str):
        return text
    if typing.get_origin(annotation) is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        if text not in choices:
            raise QatbenchError(f"{owner} argument {name}={text!r}: {valid_choices(text, choices)}")
        return text
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if annotation in (int, float, str):
            return annotation(text)
    except ValueError:
        raise QatbenchError(
            f"{owner} argument {name}={text!r} is not a valid {annotation.__name__}"
        ) from None
    raise QatbenchError(f"{owner} argument {name} has an unsupported type {annotation!r}")


def build_config(config_cls: type, values: dict[str, Any], owner: str) -> Any:
    """Instantiate `config_cls` from `values` (strings are coerced by annotation)."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            valid = valid_choices(key, fields) if fields else "it takes no arguments"
            raise QatbenchError(f"unknown {owner} argument {key!r}; {valid}")
        kwargs[key] = _coerce(owner, key, hints[key], value)
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise QatbenchError(f"{owner}: {err}") from None


def describe(config_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each hyper-parameter, for `qatbench list`."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) is Literal:
            type_name = "|".join(str(c) for c in typing.get_args(annotation))
        else:
            type_name = getattr(annotation, "__name__", str(annotation))
        rows.append((f.name, type_name, f.default, f.metadata.get("help", "")))
    return rows
