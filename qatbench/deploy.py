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
from .activations import attach
from .export import check_fits, load_export
from .fingerprint import Fingerprint, fingerprint
from .finish import exactness_report, level_tables, write_export
from .harness import RunFiles
from .step import build_training
from .results import read_record, write_record
from .spec import resolve_device, resolve_identity, resolve_task


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
    """Rebuild the model of the export at `path` and evaluate it on the task's test split. The method that trained
    it is not needed (its weights are all that is evaluated), so a plugin method's export evaluates without it."""
    loaded = load_export(path)
    identity = loaded.metadata.get("identity")
    task, recipe, spec = resolve_task(identity, device)
    run_device = resolve_device(spec.device)
    if run_device.type == "cpu":
        torch.set_num_threads(spec.threads)  # the run's own: the order of the evaluation's float sums
    source = task.locate_data(data_root, download)
    data_print = fingerprint(source.root, source.files)
    data = task.load_data(source, run_device, recipe.batch_size, torch.Generator(run_device).manual_seed(0))
    model = task.build_model().to(run_device)
    if spec.act_bits:  # the activations' quantizers, their steps loaded with the weights
        activations = identity.get("activations")
        form = activations.get("form") if isinstance(activations, dict) else None
        if form not in ("lsq", "talr"):
            raise QatbenchError(f"{path}: its identity quantizes activations but names no valid form ({form!r})")
        attach(task.activation_inputs(model), spec.act_bits, form, "lsq")
    check_fits(model, loaded.state_dict, str(path))
    model.load_state_dict(loaded.state_dict)
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)  # the memory order the run evaluated in
    metric = task.evaluate(model, data.test)
    recorded = loaded.metadata.get("metric")
    return Evaluation(task.name, task.metric, metric, recorded if isinstance(recorded, float) else None,
                      str(source.root), data_print.fingerprint == identity["data"],
                      run_device.type == identity.get("device_type"))


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
    try:
        saved = checkpoint.load(files.checkpoint, record.run_id)
    except checkpoint.Unusable as err:
        raise QatbenchError(str(err)) from None
    position = saved.get("position")
    if not isinstance(position, dict) or position.get("epoch") != run.recipe.epochs:
        raise QatbenchError(f"{files.checkpoint} is not the final checkpoint of run {record.run_id}")
    if run.act_bits and not run.method_cls.trains_activation_steps:
        raise QatbenchError(f"{record_path}: its activation steps are set on training batches as the run finishes; "
                            "every finished run exports its model itself (beside its record)")
    if saved.get("model") is None:
        raise QatbenchError(f"{files.checkpoint} holds the shards of an --fsdp run; every finished run exports its "
                            f"model itself (beside its record)")
    try:
        training = build_training(run, int(saved["steps_per_epoch"]), torch.Generator().manual_seed(record.seed + 1))
        training.model.load_state_dict(saved["model"])
        training.method.load_state_dict(saved["method"])
    except Exception as err:  # a crafted checkpoint can fail anywhere in a state dict
        raise QatbenchError(f"{files.checkpoint} does not fit run {record.run_id} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    training.method.finalize()
    record.exactness = exactness_report(run, training.model)
    tables = level_tables(run, training.model, training.method)
    record.export = write_export(run, training.model.state_dict(), tables, files.export, record)
    write_record(files.record, record)
    return record.export
