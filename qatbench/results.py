"""RunRecord: one JSON file per run, written atomically, named by the run's identity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import QatbenchError

SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "oom", "interrupted", "error")
FINISHED = ("ok", "diverged")  # statuses that are results; the others are retried on the next run


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
    metric: float | None = None  # final, after finalize(), on the whole test split
    best_epoch_metric: float | None = None  # best per-epoch value at the training-time weights
    reference_fp: float | None = None  # the task's published FP number, where known
    epochs_completed: int = 0
    num_train: int | None = None
    num_test: int | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per-epoch loss, metric, diagnostics
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    exactness: dict[str, Any] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str | None = None  # for statuses other than ok
    checkpoint: str | None = None  # where the final weights were saved (full-precision runs)
    command: str | None = None
    created: str | None = None
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(data)
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        if data["status"] not in STATUSES:
            raise ValueError(f"unknown status {data['status']!r}")
        return cls(**{k: v for k, v in data.items() if k in names})


def record_path(out_dir: Path, task: str, method: str, bits_text: str, seed: int, run_id: str) -> Path:
    return Path(out_dir) / task / f"{method}-b{bits_text}-s{seed}-{run_id}.json"


def write_record(path: Path, record: RunRecord) -> None:
    """Write atomically: a temporary file in the same folder, then `os.replace`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
        os.replace(tmp, path)
    except OSError as err:
        raise QatbenchError(f"cannot write run record {path}: {err.strerror or err}") from None


def read_record(path: Path) -> RunRecord:
    return RunRecord.from_dict(json.loads(Path(path).read_text()))


def load_records(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Records from files and folders (searched recursively); malformed files are skipped with a warning."""
    records = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise QatbenchError(f"no such file or folder: {root}")
        files = sorted(root.rglob("*.json")) if root.is_dir() else [root]
        for file in files:
            if file.name.startswith(".tmp-"):
                continue
            try:
                records.append(read_record(file))
            except (OSError, ValueError, TypeError, KeyError) as err:
                warnings.warn(f"skipping malformed record {file}: {err}", stacklevel=2)
    return records
