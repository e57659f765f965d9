"""The exported model, used: `qatbench eval EXPORT` re-evaluates it; `qatbench export RECORD` writes it
from a run's final checkpoint.

`evaluate_export` rebuilds the model from the task registry and the export alone (the
export's header holds the run's identity: task, options, recipe, quantizer, memory format,
data fingerprint), loads the dense weights rebuilt from the packed indices and level
tables, and evaluates it on the task's test split as the run's final evaluation did. On
the run's device type and data, the metric equals the record's bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .errors import QatbenchError
from .export import load_export
from .fingerprint import Fingerprint, fingerprint
from .harness import RunFiles, build_training, exactness_report, level_tables, write_export
from .results import read_record, write_record
from .spec import resolve_identity


@dataclasses.dataclass
class Evaluation:
    """What `qatbench eval` measured, beside what the run recorded."""

    task: str
    metric_name: str
    metric: float
    recorded: float | None
    data_path: str
    same_data: bool
    same_device_type: bool

    @property
    def bitwise_equal(self) -> bool:
        return self.recorded is not None and self.metric == self.recorded

    def describe(self) -> str:
        line = f"{self.task}: {self.metric_name} {self.metric!r} on {self.data_path}"
        if self.recorded is None:
            return line
        if self.bitwise_equal:
            return line + f"; equals the recorded {self.recorded!r} bit for bit"
        why = [] if self.same_data else ["other data than the run's"]
        why += [] if self.same_device_type else ["another device type than the run's"]
        return line + f"; the run recorded {self.recorded!r} (difference {self.metric - self.recorded:+.6g}" + \
            (f"; {' and '.join(why)})" if why else ")")


def evaluate_export(path: Path, data_root: Path | None = None, device: str = "cpu", download: bool = False) -> Evaluation:
    """Rebuild the model of the export at `path` and evaluate it on the task's test split."""
    loaded = load_export(path)
    identity = loaded.metadata.get("identity")
    run = resolve_identity(identity, device)
    source = run.task.locate_data(data_root, download)
    data_print = fingerprint(source.root, source.files)
    data = run.task.load_data(source, run.device, run.recipe.batch_size, torch.Generator(run.device).manual_seed(0))
    model = run.task.build_model().to(run.device)
    missing, unexpected = model.load_state_dict(loaded.state_dict, strict=False)
    if missing or unexpected:
        raise QatbenchError(f"{path} does not fit task {run.task.name!r}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    if run.spec.channels_last:
        model.to(memory_format=torch.channels_last)  # the memory order the run evaluated in
    metric = run.task.evaluate(model, data.test)
    recorded = loaded.metadata.get("metric")
    return Evaluation(run.task.name, run.task.metric, metric, recorded if isinstance(recorded, float) else None,
                      str(source.root), data_print.fingerprint == identity["data"],
                      run.device.type == identity.get("device_type"))


def export_from_checkpoint(record_path: Path) -> dict[str, Any]:
    """Write the export of the run recorded at `record_path` from its final checkpoint (kept with
    `--keep-checkpoints`): rebuild the run, load the checkpoint, `finalize()`, check exactness, export,
    and update the record. Returns what the record now says of the export."""
    try:
        record = read_record(record_path)
    except (OSError, ValueError) as err:
        raise QatbenchError(f"cannot read record {record_path}: {err}") from None
    files = RunFiles(Path(record_path))
    if not files.checkpoint.exists():
        raise QatbenchError(f"{files.checkpoint} does not exist: rerun with --keep-checkpoints to keep the final one")
    run = resolve_identity(record.spec)
    run.data_fingerprint = Fingerprint(**record.data)
    if run.run_id != record.run_id:
        raise QatbenchError(f"{record_path}: its identity does not hash to its run id {record.run_id}")
    saved = checkpoint.load(files.checkpoint, record.run_id)
    if saved is None or saved["position"]["epoch"] != run.recipe.epochs:
        raise QatbenchError(f"{files.checkpoint} is not the final checkpoint of run {record.run_id}")
    if saved["model"] is None:
        raise QatbenchError(f"{files.checkpoint} holds the shards of an --fsdp run; every finished run exports its "
                            f"model itself (beside its record)")
    training = build_training(run, saved["steps_per_epoch"], torch.Generator().manual_seed(record.seed + 1))
    training.model.load_state_dict(saved["model"])
    training.method.load_state_dict(saved["method"])
    training.method.finalize()
    record.exactness = exactness_report(run, training.model)
    tables = level_tables(run, training.model, training.method)
    record.export = write_export(run, training.model.state_dict(), tables, files.export, record)
    write_record(files.record, record)
    return record.export
