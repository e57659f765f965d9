"""RunRecord: one JSON file per run, written atomically, named by the run's identity.

Records are untrusted input when read back (they are shared, copied and edited): every
field is type-checked against the schema, a record of another schema version is refused,
names that become file names are checked, and the same run found twice counts once.
Records are strict JSON: a NaN or infinity is written as null.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .atomic import is_temporary, write_text_atomic
from .errors import QatbenchError
from .registry import check_name

SCHEMA_VERSION = 2
STATUSES = ("ok", "diverged", "oom", "interrupted", "error")
FINISHED = ("ok", "diverged")  # statuses that are results; the others are retried on the next run
RUN_ID = re.compile(r"[0-9a-f]{12}")


def identity_hash(resolved: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the fully resolved spec, keys sorted."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclasses.dataclass
class RunRecord:
    """Everything one run measured, and what it was."""

    run_id: str
    spec: dict[str, Any]  # the resolved spec the identity is computed from
    method: str
    task: str
    bits: int | None
    seed: int
    status: str
    metric_name: str
    higher_is_better: bool
    quantized: bool = True  # False for the full-precision baseline
    metric: float | None = None  # final, after finalize(), on the whole test split
    best_epoch_metric: float | None = None  # best per-epoch value at the training-time weights
    epochs_completed: int = 0
    num_train: int | None = None
    num_test: int | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # path, fingerprint, files, bytes
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per-epoch loss, metric, diagnostics
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    exactness: dict[str, Any] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    resumed: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # each resume: step, epoch, time
    message: str | None = None  # for statuses other than ok
    export: dict[str, Any] | None = None  # the saved model: file, packed_bytes, fp32_bytes, file_bytes, ratio
    command: str | None = None
    created: str | None = None
    schema: int = SCHEMA_VERSION
    source: str | None = dataclasses.field(default=None, compare=False, metadata={"transient": True})
    """The file the record was read from (not written: a record does not say where it lies)."""

    def to_json(self) -> str:
        """Strict JSON (no NaN or infinity: they become null), keys sorted."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _TRANSIENT}
        return json.dumps(_finite(fields), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        """A record from parsed JSON, every field type-checked; ValueError names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"field 'schema' is {data.get('schema')!r}; this qatbench reads schema {SCHEMA_VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _TRANSIENT}
        for name, f in fields.items():
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"field {name!r} is missing")
                continue
            _check_type(name, data[name], _FIELD_TYPES[name])
        if not RUN_ID.fullmatch(data["run_id"]):
            raise ValueError(f"field 'run_id' is {data['run_id']!r}, not 12 hex digits")
        if data["status"] not in STATUSES:
            raise ValueError(f"field 'status' is {data['status']!r}; valid: {', '.join(STATUSES)}")
        for name in ("method", "task"):
            try:
                check_name(name, data[name])
            except QatbenchError as err:
                raise ValueError(f"field {name!r}: {err}") from None
        if data["bits"] is not None and not 0 <= data["bits"] <= 8 or data["seed"] < 0:
            raise ValueError(f"field 'bits' ({data['bits']!r}) or 'seed' ({data['seed']!r}) is out of range")
        for name, shape in _NESTED.items():
            if data.get(name) is not None:
                _check_nested(name, data[name], shape)
        return cls(**{k: v for k, v in data.items() if k in fields})


_TRANSIENT = {f.name for f in dataclasses.fields(RunRecord) if f.metadata.get("transient")}
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "spec": (dict,), "method": (str,), "task": (str,), "bits": (int, type(None)),
    "seed": (int,), "status": (str,), "metric_name": (str,), "higher_is_better": (bool,), "quantized": (bool,),
    "metric": (*_NUMBER, type(None)), "best_epoch_metric": (*_NUMBER, type(None)), "epochs_completed": (int,),
    "num_train": (int, type(None)), "num_test": (int, type(None)), "data": (dict,), "history": (list,),
    "timing": (dict,), "memory": (dict,), "exactness": (dict,), "environment": (dict,),
    "resumed": (list,), "message": (str, type(None)), "export": (dict, type(None)), "command": (str, type(None)),
    "created": (str, type(None)), "schema": (int,),
}


_SCALAR = (str, int, float, bool, type(None))
_NUMBER_OR_NULL = (int, float, type(None))


@dataclasses.dataclass(frozen=True)
class _Map:
    """A JSON object whose values all have the shape `values`, except the keys named in `known`."""

    values: Any
    known: dict[str, Any] = dataclasses.field(default_factory=dict)
    nullable: bool = False


@dataclasses.dataclass(frozen=True)
class _List:
    """A JSON array whose items have the shape `items`."""

    items: Any


_CONFIG = _Map((*_SCALAR, list))  # a configuration: scalars, and lists of scalars (checked below)
_NESTED: dict[str, Any] = {  # the shapes of the nested fields, as far as anything reads them
    "spec": _Map((*_SCALAR, dict, list), {"method_config": _CONFIG, "task_config": _CONFIG, "recipe_config": _CONFIG,
                                         "quantizer": _CONFIG, "init": _Map(_SCALAR, nullable=True), "device_type": (str, type(None)),
                                         "data": (str, type(None)), "recipe": (str, type(None))}),
    "data": _Map(_SCALAR),
    "history": _List(_Map(_SCALAR)),
    "timing": _Map(_NUMBER_OR_NULL),
    "memory": _Map((*_SCALAR, dict), {"state_bytes": _Map(_NUMBER_OR_NULL)}),
    "exactness": _Map((*_SCALAR, dict), {"passed": (bool, type(None)),
                                         "tensors": _Map(_Map(_NUMBER_OR_NULL))}),
    "environment": _Map((*_SCALAR, list), {"devices": _List(_SCALAR)}),
    "resumed": _List(_Map(_SCALAR)),
    "export": _Map(_SCALAR),
}


def _check_nested(name: str, value: Any, shape: Any) -> None:
    """`value` has `shape` (a tuple of JSON types, `_Map` or `_List`), to the depth that the shape goes; lists
    inside configurations hold scalars only. ValueError names the first bad path."""
    if isinstance(shape, _Map):
        if value is None and shape.nullable:
            return
        if not isinstance(value, dict):
            raise ValueError(f"field {name!r} is {type(value).__name__} {value!r:.40}, expected an object")
        for key, item in value.items():
            _check_nested(f"{name}.{key}", item, shape.known.get(key, shape.values))
    elif isinstance(shape, _List):
        if not isinstance(value, list):
            raise ValueError(f"field {name!r} is {type(value).__name__} {value!r:.40}, expected a list")
        for i, item in enumerate(value):
            _check_nested(f"{name}[{i}]", item, shape.items)
    else:
        _check_type(name, value, shape)
        if isinstance(value, list) and not all(isinstance(item, _SCALAR) for item in value):
            raise ValueError(f"field {name!r} holds something other than single values")
        if isinstance(value, dict):
            _check_nested(name, value, _Map((*_SCALAR, list)))


def _check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    bool_ok = bool in types
    if isinstance(value, bool) and not bool_ok or not isinstance(value, types):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"field {name!r} is {type(value).__name__} {value!r:.40}, expected {expected}")


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def record_path(out_dir: Path, task: str, method: str, bits_text: str, seed: int, run_id: str) -> Path:
    """`out_dir/<task>/<method>-b<bits>-s<seed>-<run id>.json`; every part is checked, so the path stays
    in `out_dir`."""
    check_name("task", task)
    check_name("method", method)
    if bits_text not in ("FP", "T") and not bits_text.isdigit() or not isinstance(seed, int) or seed < 0 \
            or not RUN_ID.fullmatch(run_id):
        raise QatbenchError(f"invalid record name parts: bits {bits_text!r}, seed {seed!r}, run id {run_id!r}")
    return Path(out_dir) / task / f"{method}-b{bits_text}-s{seed}-{run_id}.json"


def write_record(path: Path, record: RunRecord) -> None:
    """Write atomically (a temporary file, then a rename); a failed write leaves no temporary file."""
    try:
        write_text_atomic(path, record.to_json())
    except OSError as err:
        raise QatbenchError(f"cannot write run record {path}: {err.strerror or err}") from None


MAX_RECORD_BYTES = 64 * 2**20  # far above any record's size (a few kB per epoch of history)


def read_record(path: Path) -> RunRecord:
    """A checked record; ValueError (bad content) or OSError (unreadable) otherwise."""
    with open(path, "rb") as f:
        raw = f.read(MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES // 2**20} MB: not a run record")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason})") from None
    except RecursionError:
        raise ValueError("nested too deeply to be a run record") from None
    return RunRecord.from_dict(data)


def _result(record: RunRecord) -> tuple[Any, ...]:
    """What a run measured, to tell a copy of a record from another result of the same run."""
    return record.status, record.metric, json.dumps(_finite(record.history), sort_keys=True)


def load_records(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Records from files and folders (searched recursively), each knowing its file (`source`). A malformed
    record is skipped with a warning naming the file and the field; a copy of a record (the same run with the
    same result: a copied file, a folder given twice) counts once, with a warning. Two records of one run with
    different results are both kept, with a warning: that is a finding, which the leaderboard shows."""
    records: list[RunRecord] = []
    seen: dict[str, list[RunRecord]] = {}
    files: list[Path] = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise QatbenchError(f"no such file or folder: {root}")
        files += sorted(root.rglob("*.json")) if root.is_dir() else [root]
    for file in files:
        if is_temporary(file):
            continue
        try:
            record = read_record(file)
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping malformed record {file}: {err}", stacklevel=2)
            continue
        record.source = str(file)
        same_run = seen.setdefault(record.run_id, [])
        copy = next((r for r in same_run if _result(r) == _result(record)), None)
        if copy is not None:
            warnings.warn(f"skipping {file}: run {record.run_id} was already read from {copy.source} with the same "
                          "result (counted once)", stacklevel=2)
            continue
        for other in same_run:
            warnings.warn(f"run {record.run_id} has two results: {other.metric_name} {other.metric!r} "
                          f"({other.status}) in {other.source} and {record.metric!r} ({record.status}) in {file}",
                          stacklevel=2)
        same_run.append(record)
        records.append(record)
    return records
