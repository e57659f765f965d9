"""The one exception type users see, and "did you mean" suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QatbenchError(Exception):
    """An error the user can fix. The CLI prints it as one line, never a traceback."""


def valid_choices(value: object, choices: Iterable[str]) -> str:
    """`valid choices: a, b, c; did you mean 'b'?` for an unknown `value`."""
    names = sorted(choices)
    close = difflib.get_close_matches(str(value), names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"valid choices: {', '.join(names)}{hint}"


def check_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """Return `value` if it is one of `choices`, else raise a one-line QatbenchError."""
    choices = list(choices)
    if value not in choices:
        raise QatbenchError(f"unknown {kind} {value!r}; {valid_choices(value, choices)}")
    return value
