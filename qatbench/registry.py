"""One Registry class for methods and tasks (the timm / lm-evaluation-harness pattern).

A plugin module defines one class and decorates it with its public name. Built-in
plugins are the modules of a package (`qatbench.methods`, `qatbench.tasks`),
imported on first use; outside plugins come from an entry-point group of the same
name or from `load_plugin_file(path)` (`--plugin FILE.py`).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from .errors import QatbenchError, valid_choices

T = TypeVar("T", bound=type)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""What a method or task may be called: it names record files and leaderboard pages, so no path separators."""


def check_name(kind: str, name: object) -> str:
    """`name` if it is a valid plugin name (lower-case letters, digits, '.', '_', '-'), else a one-line error."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise QatbenchError(f"invalid {kind} name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    return name


class Registry(Generic[T]):
    """Name -> class, filled by `@registry.register(name)`."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package  # also the entry-point group
        self._entries: dict[str, T] = {}
        self._missing: dict[str, str] = {}  # names whose plugin needs something not installed: what to install
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        check_name(self.kind, name)

        def decorate(cls: T) -> T:
            check = getattr(cls, "check_plugin", None)
            if callable(check):  # what the kind's contract says of a class (Task.check_plugin, Method.check_plugin)
                check()
            known = self._entries.get(name)
            if known is not None and known is not cls:
                raise QatbenchError(
                    f"{self.kind} {name!r} is registered twice: "
                    f"{known.__module__}.{known.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                )
            cls.name = name
            self._entries[name] = cls
            return cls

        return decorate

    def unavailable(self, name: str, reason: str) -> None:
        """Name a plugin that cannot be registered here (an optional extra is missing) and what it needs."""
        self._missing[check_name(self.kind, name)] = reason

    def missing(self) -> dict[str, str]:
        """{name: what it needs} of the plugins that are known but not installed."""
        self._discover()
        return dict(self._missing)

    def get(self, name: str) -> T:
        self._discover()
        if isinstance(name, str) and name not in self._entries and name in self._missing:
            raise QatbenchError(f"{self.kind} {name!r} is not installed: {self._missing[name]}")
        if not isinstance(name, str) or name not in self._entries:
            raise QatbenchError(f"unknown {self.kind} {name!r}; {valid_choices(name, self._entries)}")
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        self._discover()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def _discover(self) -> None:
        """Import the built-in plugin modules and the entry points, once."""
        if self._discovered:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")
        for entry in entry_points(group=self.package):
            try:
                entry.load()
            except QatbenchError:
                raise
            except Exception as err:  # an installed package's plugin that fails to import
                raise QatbenchError(f"the {self.kind} plugin {entry.name!r} ({entry.value}) of entry-point group "
                                    f"{self.package!r} failed to load: {_one_line(err)}") from None
        self._discovered = True


def load_plugin_file(path: str | Path) -> None:
    """Execute a plugin file, so that its `@register` decorators run (once per process and file)."""
    path = Path(path)
    if not path.is_file():
        raise QatbenchError(f"plugin file {str(path)!r} does not exist")
    module_name = f"qatbench_plugin_{path.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise QatbenchError(f"plugin file {str(path)!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except QatbenchError:
        del sys.modules[module_name]
        raise
    except SyntaxError as err:
        del sys.modules[module_name]
        raise QatbenchError(f"plugin file {str(path)!r}, line {err.lineno}: SyntaxError: {err.msg}") from None
    except Exception as err:  # any failure of the plugin's own code: where in the file, and what
        del sys.modules[module_name]
        raise QatbenchError(f"plugin file {str(path)!r}{_line_in(err, path)}: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _line_in(err: BaseException, path: Path) -> str:
    """`, line N`: the last line of `path` on the error's traceback (where the plugin's code failed)."""
    line = None
    for frame, number in traceback.walk_tb(err.__traceback__):
        if Path(frame.f_code.co_filename).resolve() == path.resolve():
            line = number
    return f", line {line}" if line is not None else ""


METHODS: Registry = Registry("method", "qatbench.methods")
TASKS: Registry = Registry("task", "qatbench.tasks")
