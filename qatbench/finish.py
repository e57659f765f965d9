"""The end of a run's training: exact quantization, its check, the final evaluation and the export.

`finish` calls the method's `finalize()`, which must leave every quantized tensor exactly on its
levels, checks that it did (at most m distinct values per row of every quantized tensor),
evaluates the final model on the whole test split, and exports it as packed level indices and
level tables (`qatbench.export`), unless the check failed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .activations import calibrate
from .errors import QatbenchError
from .export import export_model
from .method import Method
from .quant import check_exact
from .results import RunRecord
from .sharding import whole_level_tables, whole_state_dict, whole_weights
from .spec import ResolvedRun


CALIBRATION_BATCHES = 4  # training batches that set the activation steps of a method that does not train them (rtn)


def finish(run: ResolvedRun, record: RunRecord, model: torch.nn.Module, method: Method, train: Any, test: Any,
           export_to: Path | None) -> None:
    """Finalize the method, check exactness, evaluate (the record's metric, its time in `final_eval_s`) and export
    to `export_to` (the record says how large, or why not); the record's status is then `ok`. A run that quantizes
    activations with a method that does not train their steps (rtn) first sets them on a few training batches."""
    method.finalize()
    if run.act_bits and not run.method_cls.trains_activation_steps:
        calibrate(model, model, train, CALIBRATION_BATCHES)
    tables, weights = level_tables(run, model, method), whole_state_dict(model)  # under FSDP: gathered
    with whole_weights(model):
        record.exactness = exactness_report(run, model)
        start = time.perf_counter()
        record.metric = run.task.evaluate(model, test)
        record.timing["final_eval_s"] = time.perf_counter() - start
    if export_to is not None:
        record.export = write_export(run, weights, tables, export_to, record)
    record.status = "ok"


def exactness_report(run: ResolvedRun, model: torch.nn.Module) -> dict[str, Any]:
    """The exactness check of a finalized model: at most m distinct values per row of every quantized tensor."""
    if not run.method_cls.quantizes:
        return {"passed": None, "reason": "full-precision method"}
    checks = [check_exact(n, p, run.quantizer.granularity, run.quantizer.bits)
              for n, p in model.named_parameters() if run.task.is_quantized(n, p)]
    return {"passed": all(c.ok for c in checks), "granularity": run.quantizer.granularity,
            "tensors": {c.name: {"distinct": c.distinct, "allowed": c.allowed} for c in checks}}


def level_tables(run: ResolvedRun, model: torch.nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """After `finalize()`: the level table `(rows, m)` of each quantized tensor, by parameter name, whole (under
    FSDP gathered from every rank's rows); empty for a full-precision method."""
    if not run.method_cls.quantizes:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    tables = method.level_tables()
    if method.sharded:
        tables = whole_level_tables(tables, rows_span_ranks=run.quantizer.granularity == "tensor")
    return {names[id(p)]: q for p, q in zip(method.quantized_params(), tables)}


def write_export(run: ResolvedRun, weights: dict[str, torch.Tensor], tables: dict[str, torch.Tensor], path: Path,
                 record: RunRecord) -> dict[str, Any]:
    """Export the finalized model's state dict `weights` (packed indices and its `level_tables`); what the record
    says of it, or why not."""
    if record.exactness.get("passed") is False:
        return {"error": "not exported: the model is not exactly quantized"}
    metadata = {"run_id": run.run_id, "identity": run.identity, "metric_name": record.metric_name,
                "metric": record.metric}
    try:
        summary = export_model(path, weights, tables, run.quantizer if tables else None, metadata)
    except QatbenchError as err:
        return {"error": str(err)}
    if run.method_cls.quantizes and not tables:  # evaluable, but not the packed size of a quantized model
        return {**dataclasses.asdict(summary), "packed": False,
                "note": f"method {run.method_cls.name!r} gives no level_tables(): its weights are stored dense"}
    return summary.to_dict()
