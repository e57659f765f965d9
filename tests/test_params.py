import dataclasses
from typing import Literal

import pytest

from qatbench.errors import QatbenchError
from qatbench.params import build_config, describe, param, parse_assignments


@dataclasses.dataclass(frozen=True)
class Knobs:
    steps: int = param(10, "how many")
    rate: float = param(0.5, "how fast")
    on: bool = param(False, "whether")
    mode: Literal["a", "b"] = param("a", "which")


def test_strings_are_coerced_by_annotation():
    config = build_config(Knobs, {"steps": "3", "rate": "1e-3", "on": "true", "mode": "b"}, "method 'x'")
    assert config == Knobs(steps=3, rate=1e-3, on=True, mode="b")


def test_unknown_key_lists_valid_ones_with_suggestion():
    with pytest.raises(QatbenchError, match=r"unknown method 'x' argument 'step'; valid choices: mode, on, rate, steps; did you mean 'steps'"):
        build_config(Knobs, {"step": "3"}, "method 'x'")


@pytest.mark.parametrize("key, value", [("steps", "ten"), ("rate", "fast"), ("on", "maybe")])
def test_value_of_the_wrong_type_is_rejected(key, value):
    with pytest.raises(QatbenchError, match=f"{key}={value!r} is not a valid"):
        build_config(Knobs, {key: value}, "method 'x'")


def test_literal_value_outside_choices_is_rejected():
    with pytest.raises(QatbenchError, match="mode='c'.*valid choices: a, b"):
        build_config(Knobs, {"mode": "c"}, "method 'x'")


def test_parse_assignments():
    assert parse_assignments(["a=1", "b = x"], "--method-arg") == {"a": "1", "b": "x"}
    with pytest.raises(QatbenchError, match="not of the form key=value"):
        parse_assignments(["oops"], "--method-arg")


def test_describe_lists_fields_with_defaults_and_help():
    assert describe(Knobs)[0] == ("steps", "int", 10, "how many")
    assert describe(Knobs)[3][1] == "a|b"
