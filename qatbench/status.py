"""`qatbench status RUNS_DIR`: where every run of a results folder stands.

A run is what its files beside each other say: a finished record (ok or diverged, with
its metric), a record of a run that did not finish (interrupted, error, oom) with or
without a checkpoint to resume from, a checkpoint without a record (the process was
killed), a lock (running, held by a host and pid; or stale, its owner gone), or, for
runs of the sweep files given with `--sweep`, nothing at all (never started).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

from . import checkpoint
from .atomic import is_temporary
from .locks import ABANDONED_AFTER_S, held_by_live_process, read_lock
from .results import FINISHED, read_record

STATES = ("finished", "failed", "interrupted", "running", "stale lock", "never started")


@dataclasses.dataclass
class RunStatus:
    """One line of `qatbench status`."""

    run: str  # the record's path without its suffix, relative to the folder
    state: str  # one of STATES
    detail: str
    status: str | None = None  # the record's status, when there is a record
    metric: float | None = None
    epochs_completed: int | None = None  # from the checkpoint (the text says the epoch under way: this + 1)
    epochs: int | None = None
    checkpoint_age_s: float | None = None
    holder: str | None = None  # host:pid of a lock


def _describe_checkpoint(path: Path, row: RunStatus) -> str:
    head = checkpoint.header(path)
    row.checkpoint_age_s = checkpoint.age_s(path)
    age = f"checkpoint {row.checkpoint_age_s / 60:.0f} min old" if row.checkpoint_age_s is not None else ""
    if head is None:
        return f"unreadable checkpoint {path.name}"
    row.epochs_completed, row.epochs = head["position"]["epoch"], head["epochs"]
    return f"epoch {row.epochs_completed + 1} of {row.epochs} (step {head['position']['step']}), {age}"


def run_status(stem: Path, root: Path) -> RunStatus:
    """The state of the run whose files are `stem`.json/.ckpt/.lock."""
    record_file, checkpoint_file, lock_file = (stem.with_suffix(s) for s in (".json", ".ckpt", ".lock"))
    row = RunStatus(run=str(stem.relative_to(root)), state="never started", detail="")
    record = None
    if record_file.exists():
        try:
            record = read_record(record_file)
        except (OSError, ValueError) as err:
            row.state, row.detail = "failed", f"unreadable record: {err}"
            return row
        row.status, row.metric = record.status, record.metric
        if record.status in FINISHED:
            metric = "" if record.metric is None else f" {record.metric_name} {record.metric:.2f}"
            row.state, row.detail = "finished", f"{record.status}{metric}"
            return row
    if lock_file.exists() or lock_file.is_symlink():
        info = read_lock(lock_file)
        row.holder = f"{info.host}:{info.pid}" if info else None
        if held_by_live_process(lock_file) or info is not None and not _on_this_host(info.host) and \
                info.age_s < ABANDONED_AFTER_S:
            row.state = "running"
            row.detail = info.describe() if info else "locked"
            if checkpoint_file.exists():
                row.detail += "; " + _describe_checkpoint(checkpoint_file, row)
            return row
        row.state = "stale lock"
        if info is None:
            row.detail = f"{lock_file.name} is unreadable or empty and no process holds it"
        elif _on_this_host(info.host):
            row.detail = f"{info.describe()}, but pid {info.pid} is gone"
        else:
            row.detail = f"{info.describe()}: no heartbeat for {info.age_s / 60:.0f} min, its owner is gone"
        return row
    if checkpoint_file.exists():
        row.state = "interrupted"
        why = f"{record.status}: {record.message}" if record else "killed (no record)"
        row.detail = f"{_describe_checkpoint(checkpoint_file, row)}; {why}"
        return row
    if record is not None:
        row.state = "interrupted" if record.status == "interrupted" else "failed"
        row.detail = f"{record.status}: {record.message}"
    return row


def _on_this_host(host: str) -> bool:
    import socket

    return host == socket.gethostname()


def folder_status(root: Path, expected: list[Path] = ()) -> list[RunStatus]:
    """Every run under `root` (and every expected record path, started or not), sorted by name."""
    stems = {p.with_suffix("") for suffix in ("*.json", "*.ckpt", "*.lock") for p in root.rglob(suffix)
             if not is_temporary(p)}
    stems |= {p.with_suffix("") for p in expected}
    return [run_status(stem, root) for stem in sorted(stems)]


def render(rows: list[RunStatus], fmt: str) -> str:
    """`text` (aligned lines and totals), `csv` or `json`."""
    if fmt == "json":
        return json.dumps([dataclasses.asdict(r) for r in rows], indent=1)
    if fmt == "csv":
        import csv

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in dataclasses.fields(RunStatus)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
        return buffer.getvalue()
    width = max((len(r.run) for r in rows), default=0)
    lines = [f"{r.run:<{width}}  {r.state:<13}  {r.detail}" for r in rows]
    counts = Counter(r.state for r in rows)
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]))
    return "\n".join(lines)
