"""Run records -> per-cell statistics (pandas) -> leaderboards in markdown, CSV, JSON or LaTeX, and figures.

One page per task; inside it one section per training budget (task options, epochs, batch size, optimizer,
device type), so that runs of different budgets are never averaged together and every method meets the FP
baseline trained on the same budget. A row is a method with its hyper-parameters (learning rate, schedule,
quantizer scheme and granularity, the method's own options): those that vary within a section are written
in the row label. A cell is one row at one bit width over its seeds: `mean ± s (n)` and the 95 % Student-t
interval of the mean; in each bit-width column every pair of cells is compared over the seeds (paired where
they ran the same seeds, Welch's otherwise) with Holm's adjustment over the column, bold marks the best mean
and every cell not told apart from it, and one sentence under the table says what the column decides
(`qatbench.verdicts`); cells that look wrong next to their neighbours are flagged for a reader to check. Each section adds the difference to FP, the cost (step time,
training time, training-state and peak memory, packed size, exactness, transition rate), the papers'
numbers where known, and figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import stats, verdicts
from .atomic import write_text_atomic
from .errors import QatbenchError
from .plots import (
    metric_vs_bits_plot,
    metric_vs_size_plot,
    metric_vs_time_plot,
    transition_rate_plot,
)
from .quant import bits_label, bits_order, bits_words, parse_bits
from .results import RunRecord
from .task import hyperparameters, published

FORMATS = {"md": "md", "csv": "csv", "json": "json", "latex": "tex"}  # format -> file extension
BUDGET_KEYS = ("epochs", "epoch_steps", "batch_size", "optimizer")  # recipe keys of a section; the others per row
NOT_ROW_KEYS = ("method", "method_config", "task", "task_config", "seed", "data", "device_type", "recipe_config",
                "quantizer", "activations")  # identity keys a row never names (its cell, its section, expanded below)
ENVIRONMENT_KEYS = ("git_commit", "torch", "cuda", "device_name", "python")  # what can explain two results of a run
SHARED_SHOWN = ("recipe", "lr", "lr_schedule", "weight_decay", "scheme", "granularity", "precision", "threads",
                "processes")
MB = 2**20
REFERENCE_PREFIX = "torchao-"  # a method named torchao-X runs the PARQ authors' reference of qatbench's X
CELL_COLUMNS = [  # the columns of the CSV and JSON formats, one row per cell
    "task", "section", "row", "method", "quantized", "bits", "metric_name", "higher_is_better", "n", "mean", "std",
    "ci_low", "ci_high", "is_best", "p_vs_best", "test_vs_best", "significant_vs_best", "bold", "decision", "check",
    "delta_vs_fp", "paper",
    "paper_mean", "delta_vs_paper", "paper_in_ci", "step_ms", "step_vs_fp", "train_s", "state_mb", "peak_mb",
    "peak_kind", "peak_reserved_mb", "packed_mb", "exact_passed", "exact_checked", "transition_rate",
]


# ---------------------------------------------------------------- records -> frame


def records_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per record, with its section (budget), its row configuration and the measured values."""
    frame = pd.DataFrame([_record_row(r) for r in records])
    frame = frame.sort_values("source", kind="stable", ignore_index=True)  # which of two records counts: the first
    numeric = ["metric", "step_ms", "train_s", "state_mb", "peak_mb", "peak_reserved_mb", "packed_mb", "fp32_mb",
               "transition_rate"]
    return frame.astype({c: float for c in numeric})


def _record_row(r: RunRecord) -> dict[str, Any]:
    spec = r.spec
    device_type = spec.get("device_type") or (r.environment or {}).get("device_type")
    quantized = bool(getattr(r, "quantized", r.bits is not None))
    memory = r.memory or {}
    export = getattr(r, "export", None) or {}
    environment = r.environment or {}
    return {
        "run_id": r.run_id, "source": r.source or "", "environment": json.dumps(
            {k: environment.get(k) for k in ENVIRONMENT_KEYS}, sort_keys=True, default=str),
        "task": r.task, "method": r.method, "quantized": quantized, "bits": column_label(r, quantized),
        "bits_order": column_order(r, quantized), "seed": r.seed, "status": r.status,
        "metric": r.metric, "metric_name": r.metric_name, "higher_is_better": r.higher_is_better,
        "section": section_key(spec), "byte_tokens": (spec.get("task_config") or {}).get("tokenizer") == "byte",
        "method_config": json.dumps(spec.get("method_config") or {}, sort_keys=True),
        "row_config": json.dumps(_row_config(spec, quantized), sort_keys=True, default=str),
        "device_type": device_type, "step_ms": (r.timing or {}).get("steady_step_ms"),
        "train_s": (r.timing or {}).get("train_s"), "state_mb": _mb((memory.get("state_bytes") or {}).get("total")),
        "peak_mb": memory.get("peak_allocated_mb") if device_type == "cuda" else memory.get(
            "step_rss_increase_mb", memory.get("peak_rss_increase_mb")),
        "peak_reserved_mb": memory.get("peak_reserved_mb"), "packed_mb": _mb(export.get("packed_bytes")) if export.get("packed", True) else None,
        "fp32_mb": _mb(export.get("fp32_bytes")), "exact": (r.exactness or {}).get("passed"),
        "transition_rate": r.history[-1].get("transition_rate") if r.history else None,
        "transition_series": [h.get("transition_rate") for h in r.history],
        "num_test": r.num_test, "command": r.command, "commit": (r.environment or {}).get("git_commit"),
        "device": (r.environment or {}).get("device_name"),
    }


def _activation_bits(r: RunRecord) -> int | None:
    activations = r.spec.get("activations")
    bits = activations.get("bits") if isinstance(activations, dict) else None
    return bits if isinstance(bits, int) and not isinstance(bits, bool) else None


def column_label(r: RunRecord, quantized: bool) -> str:
    """The table column of a record: its bit width ("2", "T"), "W/A" ("2/2") when it quantizes activations too,
    "FP" for the full-precision baseline."""
    if not quantized:
        return "FP"
    act = _activation_bits(r)
    return f"{bits_label(r.bits)}/{act}" if act else bits_label(r.bits)


def column_order(r: RunRecord, quantized: bool) -> float:
    """Weight-only columns by bit width, then the W/A columns, FP last."""
    act = _activation_bits(r) if quantized else None
    return bits_order(r.bits if quantized else None) + (100 + act / 100 if act else 0)


def _mb(value: float | None) -> float | None:
    return None if value is None else value / MB


def section_key(spec: dict[str, Any]) -> str:
    """The training budget a record belongs to, as a heading: epochs (and their step cap), batch size,
    optimizer, device type, the task's options and the data. Everything else of the spec (LR included) is a
    property of the row."""
    recipe = spec.get("recipe_config") or {}
    steps = f" of at most {recipe['epoch_steps']} steps" if recipe.get("epoch_steps") else ""
    text = (f"{recipe.get('epochs')} epochs{steps}, batch {recipe.get('batch_size')}, {recipe.get('optimizer')} "
            f"on {spec.get('device_type')}")
    options = spec.get("task_config") or {}
    text += "; " + ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(options.items())) if options else ""
    return text + (f"; data {spec['data']}" if spec.get("data") else "")


def _row_config(spec: dict[str, Any], quantized: bool) -> dict[str, Any]:
    """Everything in a run's identity that is neither its cell (method, bits, seed) nor its section (budget, task,
    data, device type): the recipe's keys outside the budget (LR, schedule, ...), the quantizer (for quantized runs:
    the FP baseline's quantizer only measures transitions) and every run option (precision, threads, processes,
    ...), so that two runs of one seed in one cell are runs of one identity."""
    recipe = {k: v for k, v in (spec.get("recipe_config") or {}).items() if k not in BUDGET_KEYS}
    quantizer = {k: v for k, v in (spec.get("quantizer") or {}).items() if k not in ("bits", "scale")} if quantized else {}
    rest = {k: v for k, v in spec.items() if k not in (*NOT_ROW_KEYS, "steps")}
    return {**rest, **_steps_config(spec.get("steps"), spec.get("activations")), **recipe, **quantizer}


STEP_KEYS = ("weight_steps", "step_init", "step_lr", "step_momentum", "act_step_init")  # a row's learned steps
OWN_STEP_KEYS = ("step_lr", "step_momentum", "act_step_init")
"""Row settings of learned steps whose defaults are each method's own (TALR trains its steps at 0.01 without
momentum, LSQ at the recipe's lr; TALR starts activation steps at 3 std, LSQ at 2 mean|x| / sqrt(Q_P)): a label
names them where they vary between the method's runs of a section."""


def _steps_config(steps: Any, activations: Any) -> dict[str, Any]:
    """The identity's learned steps as row settings that name themselves: `weight_steps` (estimated, learned or
    frozen: a label names it unless estimated, so a W+A run of a method shares the row of its weight-only runs and
    an LSQ row reads `weight_steps=learned`), and `OWN_STEP_KEYS` (the steps' lr and momentum, None for the
    recipe's, and where the activations' steps start). The quantizer's `scale` is left out beside them: learned
    or frozen weight steps are exactly `scale: learned`."""
    config = {}
    if isinstance(steps, dict):
        config = {"weight_steps": steps.get("weights"), "step_lr": steps.get("lr"), "step_momentum": steps.get("momentum")}
    if isinstance(activations, dict):
        config["act_step_init"] = activations.get("init")
    return config


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def label_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a `row` column: the method, plus the configuration keys that vary within its (task, section):
    its own options where they vary between its runs, the shared hyper-parameters where they vary between any runs
    of the section, its weights' steps unless estimated, and its learned steps' own settings (`OWN_STEP_KEYS`)
    where they vary between its runs."""
    labels = pd.Series("", index=frame.index, dtype=object)
    for _, section in frame.groupby(["task", "section"]):
        shared = section["row_config"].map(json.loads)
        shared_keys = [k for k in _varying_keys(shared.tolist(), absent_differs=False)  # FP rows lack quantizer keys
                       if k != "weight_steps" and k not in OWN_STEP_KEYS]
        for method, group in section.groupby("method"):
            own = group["method_config"].map(json.loads)
            own_keys = _varying_keys(own.tolist(), absent_differs=True)
            step_keys = [k for k in _varying_keys(shared[group.index].tolist(), absent_differs=False)
                         if k in OWN_STEP_KEYS]
            for index in group.index:
                config = shared[index]
                named = {k: config[k] for k in [*shared_keys, *step_keys] if k in config}
                if config.get("weight_steps") not in (None, "estimated"):
                    named["weight_steps"] = config["weight_steps"]
                parts = [f"{k}={_value_text(own[index][k])}" for k in own_keys if k in own[index]]
                parts += [f"{k}={_value_text(v)}" for k, v in sorted(named.items())]
                labels[index] = f"{method} ({', '.join(parts)})" if parts else method
    return frame.assign(row=labels)


def _varying_keys(configs: list[dict[str, Any]], absent_differs: bool) -> list[str]:
    """Keys that take more than one value among the configurations that have them; with `absent_differs`, a key
    that some configurations lack varies too."""
    keys = sorted({k for c in configs for k in c})
    values = {k: {json.dumps(c[k], sort_keys=True, default=str) if k in c else None for c in configs} for k in keys}
    return [k for k in keys if len(values[k] - ({None} if not absent_differs else set())) > 1]


def _finished(frame: pd.DataFrame) -> pd.Series:
    """Records that enter the tables: status ok and a finite metric."""
    return (frame["status"] == "ok") & frame["metric"].map(math.isfinite)


SAMPLE_KEYS = ["task", "section", "row", "bits", "seed"]  # one sample of a cell: one seed of one configuration


def finished_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The records of `frame` that enter the tables, labelled by `label_rows` (so that a failed run's settings
    never change a label), one per seed of a cell (per side, when `frame` has sides): where two records are one
    sample (a conflict, `conflicts`), the first in file order counts."""
    labelled = label_rows(frame[_finished(frame)])
    sample = [*SAMPLE_KEYS, "side"] if "side" in labelled else SAMPLE_KEYS
    return labelled.drop_duplicates(sample, keep="first")


@dataclasses.dataclass(frozen=True)
class Conflict:
    """Two or more finished records of one seed of one cell whose metrics differ: a finding, never averaged."""

    task: str
    cell: str  # task, section, row, bits and seed, as text
    entries: tuple[tuple[str, float], ...]  # (file, metric) of each record, the one that counts first
    explained_by: tuple[str, ...]  # what differs between them: identity keys (threads, ...) or environment keys

    @property
    def explained(self) -> bool:
        return bool(self.explained_by)

    def describe(self) -> str:
        values = "; ".join(f"{metric!r} in {source}" for source, metric in self.entries)
        why = f"they differ in {', '.join(self.explained_by)}" if self.explained else "nothing recorded differs"
        return f"{self.cell}: {values} ({why}; the first counts)"


def conflicts(frame: pd.DataFrame) -> list[Conflict]:
    """Every seed of a cell that finished records disagree on: their metrics differ (a copy with the same result
    is no conflict). Explained where their identities (the run ids differ, e.g. in the thread count of records
    older than it) or their environments (commit, torch, CUDA, device, Python) differ."""
    found = []
    for key, group in label_rows(frame[_finished(frame)]).groupby(SAMPLE_KEYS, sort=True):
        if len(group) < 2 or group["metric"].nunique() < 2:
            continue
        specs = [json.loads(c) for c in group["row_config"]]
        differ = [k for k in _varying_keys(specs, absent_differs=True)] if group["run_id"].nunique() > 1 else []
        environments = [json.loads(e) for e in group["environment"]]
        differ += [k for k in _varying_keys(environments, absent_differs=True)]
        task, section, row, bits, seed = key
        found.append(Conflict(task, f"{task} [{section}] {row} bits {bits} seed {seed}",
                              tuple(zip(group["source"], group["metric"])), tuple(differ)))
    return found


# ---------------------------------------------------------------- frame -> cells


def cells(records: Sequence[RunRecord], allow_conflicts: bool = False) -> pd.DataFrame:
    """One row per (task, section, row, bits) over the finished runs, with the columns of `CELL_COLUMNS`: the
    summary and interval, the verdict against the best cell of its column, the difference to the section's FP
    baseline, the paper's number, and the cost."""
    if not records:
        raise QatbenchError("no run records found")
    frame = records_frame(records)
    checked_conflicts(frame, allow_conflicts)
    return cell_frame(finished_rows(frame))


def checked_conflicts(frame: pd.DataFrame, allow: bool) -> list[Conflict]:
    """The conflicts of `frame`, each one a warning; a one-line error where one is unexplained (nothing recorded
    differs between its records), unless `allow`: a table is not published over a finding nobody looked at."""
    found = conflicts(frame)
    for conflict in found:
        warnings.warn(f"conflict: {conflict.describe()}", stacklevel=2)
    unexplained = [c for c in found if not c.explained]
    if unexplained and not allow:
        raise QatbenchError(f"{len(unexplained)} seed(s) of a cell have records that disagree and nothing recorded "
                            f"explains it (first: {unexplained[0].describe()}); find out why, or pass "
                            "--allow-conflicts to publish with the first record of each counted and every value "
                            "listed")
    return found


def cell_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The cells of a labelled frame of finished records, sorted by task, section, row and bit width."""
    if frame.empty:
        return pd.DataFrame(columns=[*CELL_COLUMNS, "bits_order", "fp32_mb", "device_type", "values", "byte_tokens"])
    keys = ["task", "section", "row", "bits"]
    table = pd.DataFrame([_summarize_cell(g) for _, g in frame.groupby(keys, sort=False)])
    table = table.sort_values(["task", "section", "quantized", "row", "bits_order"], ignore_index=True)
    table = _with_verdicts(table)
    table = _with_baseline(table)
    table = _with_flags(table)
    return _with_published(table)


def _summarize_cell(group: pd.DataFrame) -> dict[str, Any]:
    first = group.iloc[0]
    summary = stats.summarize(group["metric"].tolist())
    exact = group["exact"].dropna().astype(bool)
    cuda = first["device_type"] == "cuda"
    return {
        "task": first["task"], "section": first["section"], "row": first["row"], "method": first["method"],
        "quantized": bool(first["quantized"]), "bits": first["bits"], "bits_order": first["bits_order"],
        "metric_name": first["metric_name"], "higher_is_better": bool(first["higher_is_better"]),
        "byte_tokens": bool(first["byte_tokens"]), "device_type": first["device_type"], "values": dict(zip(group["seed"], group["metric"])),
        "n": summary.n, "mean": summary.mean, "std": summary.std,
        "ci_low": summary.ci_low, "ci_high": summary.ci_high, "step_ms": group["step_ms"].median(),
        "train_s": group["train_s"].median(), "state_mb": group["state_mb"].median(),
        "peak_mb": group["peak_mb"].max(), "peak_kind": "cuda allocated" if cuda else "cpu rss increase",
        "peak_reserved_mb": group["peak_reserved_mb"].max(), "packed_mb": group["packed_mb"].median(),
        "fp32_mb": group["fp32_mb"].median(), "exact_passed": int(exact.sum()), "exact_checked": len(exact),
        "transition_rate": group["transition_rate"].mean(),
    }


def _summary(cell: pd.Series) -> stats.Summary:
    return stats.Summary(cell["mean"], cell["std"], int(cell["n"]), cell["ci_low"], cell["ci_high"])


def _with_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Each (task, section, bit width) column of quantized cells decided (`qatbench.verdicts.decide`): every pair
    compared over its seeds, Holm-adjusted; per cell whether it is the best, its adjusted p-value and test against
    the best, whether that rejects equality, bold (the best's group), and the column's sentence. FP cells are not
    ranked, nor are the reference's rows (`torchao-*`: they are set against qatbench's rule in a table of their own,
    and would only dilute the column's family of tests)."""
    found: dict[int, dict[str, Any]] = {}
    ranked = table["quantized"] & ~table["method"].str.startswith(REFERENCE_PREFIX)
    for (_, _, bits), group in table[ranked].groupby(["task", "section", "bits"]):
        cells = [verdicts.Cell(cell["row"], cell["values"]) for _, cell in group.iterrows()]
        decision = verdicts.decide(bits_words(bits), cells, bool(group["higher_is_better"].iloc[0]))
        for i, cell in group.iterrows():
            versus = decision.against_best(cell["row"])
            tested = versus is not None and versus.p_holm is not None
            found[i] = {"is_best": cell["row"] == decision.best, "bold": cell["row"] in decision.top,
                        "p_vs_best": versus.p_holm if tested else None,
                        "test_vs_best": versus.test if versus is not None else None,
                        "significant_vs_best": (versus.winner is not None) if tested else (
                            False if cell["row"] == decision.best else None),
                        "decision": decision.sentence}

    def column(key: str, missing: Any = None, dtype: type = object) -> pd.Series:
        """One value per cell; `dtype` object keeps Python booleans and None, whatever the mix."""
        return pd.Series([found[i][key] if i in found else missing for i in table.index], index=table.index,
                         dtype=dtype)

    return table.assign(is_best=column("is_best"), p_vs_best=column("p_vs_best", dtype=float),
                        test_vs_best=column("test_vs_best"), significant_vs_best=column("significant_vs_best"),
                        bold=column("bold", missing=False), decision=column("decision"))


def _with_flags(table: pd.DataFrame) -> pd.DataFrame:
    """The reasons to check each cell (`qatbench.verdicts.flags`), joined; None where there is none."""
    reasons: dict[tuple[str, str, str, str], list[str]] = {}
    for (task, section), group in table.groupby(["task", "section"]):
        quantized = group[group["quantized"]]
        rows = {row: {cell["bits"]: _summary(cell) for _, cell in cells.iterrows()}
                for row, cells in quantized.groupby("row")}
        weight_only = [b for b in _bits_columns(group) if "/" not in b]
        fp = _baseline(group)
        for flag in verdicts.flags(rows, weight_only, None if fp is None else _summary(fp),
                                   bool(group["higher_is_better"].iloc[0])):
            reasons.setdefault((task, section, flag.row, flag.column), []).append(flag.reason)
    check = [("; ".join(reasons[key]) if (key := (c["task"], c["section"], c["row"], c["bits"])) in reasons
              else None) for _, c in table.iterrows()]
    return table.assign(check=pd.Series(check, index=table.index, dtype=object))


def _baseline(section: pd.DataFrame) -> pd.Series | None:
    """The section's FP baseline: its full-precision cell with the best mean (None where there is none)."""
    fp = section[~section["quantized"]]
    if fp.empty:
        return None
    higher = bool(fp["higher_is_better"].iloc[0])
    return fp.loc[fp["mean"].idxmax() if higher else fp["mean"].idxmin()]


def _with_baseline(table: pd.DataFrame) -> pd.DataFrame:
    """Difference of each cell's mean to the FP baseline of its section, and its step time as a ratio."""
    delta = pd.Series(math.nan, index=table.index)
    ratio = pd.Series(math.nan, index=table.index)
    for _, section in table.groupby(["task", "section"]):
        fp = _baseline(section)
        if fp is not None:
            delta[section.index] = section["mean"] - fp["mean"]
            ratio[section.index] = section["step_ms"] / fp["step_ms"]
    return table.assign(delta_vs_fp=delta, step_vs_fp=ratio)


def _published_values(task: str) -> dict[tuple[str | None, str], tuple[str, float]]:
    """{(method, column label): (text, mean)} of the papers' numbers; the first paper's FP number under
    (None, "FP")."""
    values: dict[tuple[str | None, str], tuple[str, float]] = {}
    try:
        for paper in published(task):
            if paper.get("fp") is not None and (None, "FP") not in values:
                values[(None, "FP")] = (str(paper["fp"]), stats.parse_mean_std(paper["fp"])[0])
            for method, row in (paper.get("rows") or {}).items():
                for bits, text in row.items():
                    values[(method, str(bits))] = (str(text), stats.parse_mean_std(text)[0])
    except ValueError as err:
        raise QatbenchError(f"tasks/references.yaml, task {task!r}: {err}") from None
    return values


def label_order(label: str) -> float:
    """The order of a column label: "1" < "T" < "2" < ... < "8" < "2/2" < "4/4" (W/A) < "FP"."""
    if label == "FP":
        return float("inf")
    weights, _, activations = str(label).partition("/")
    return bits_order(parse_bits(weights)) + (100 + int(activations) / 100 if activations else 0)


def _with_published(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's number of each cell (by method and bit width; FP cells against the paper's FP), ours minus the
    paper's mean, and whether the paper's mean lies inside our interval (None for a single run)."""
    paper, paper_mean, delta, in_ci = [], [], [], []
    known = {task: _published_values(task) for task in table["task"].unique()}
    for _, cell in table.iterrows():
        key = (cell["method"], cell["bits"]) if cell["quantized"] else (None, "FP")
        text, mean = known[cell["task"]].get(key, (None, math.nan))
        paper.append(text)
        paper_mean.append(mean)
        delta.append(cell["mean"] - mean)
        in_ci.append(None if text is None else stats.inside(mean, cell["ci_low"], cell["ci_high"]))
    return table.assign(paper=paper, paper_mean=paper_mean, delta_vs_paper=delta,
                        paper_in_ci=pd.Series(in_ci, index=table.index, dtype=object))


# ---------------------------------------------------------------- formats


def render(records: Sequence[RunRecord], fmt: str, regenerate: str,
           allow_conflicts: bool = False) -> dict[str, str]:
    """{task: text} in `fmt`: md (the leaderboard page), csv or json (one row per cell, the columns of
    `CELL_COLUMNS`), latex (a booktabs tabular of each section's metric table)."""
    if fmt not in FORMATS:
        raise QatbenchError(f"unknown leaderboard format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "md":
        return build(records, regenerate, allow_conflicts=allow_conflicts)
    table = cells(records, allow_conflicts)
    tables = {task: table[table["task"] == task] for task in sorted({r.task for r in records})}
    if fmt == "latex":
        return {task: _latex(task, group, regenerate) for task, group in tables.items()}
    if fmt == "csv":
        return {task: group[CELL_COLUMNS].to_csv(index=False) for task, group in tables.items()}
    return {task: group[CELL_COLUMNS].to_json(orient="records", indent=1) + "\n" for task, group in tables.items()}


def _latex(task: str, table: pd.DataFrame, regenerate: str) -> str:
    """Per section: a comment naming the budget and the rule, then the tabular (`\\usepackage{booktabs}`)."""
    parts = [f"% {task}: final metric per method and bit width; regenerate with: {regenerate}"]
    for section, group in _sections(table):
        bits_cols = _bits_columns(group)
        first = group.iloc[0]
        direction = "higher is better" if first["higher_is_better"] else "lower is better"
        legend = (f"% Cells: final {first['metric_name']} ({direction}), mean $\\pm$ sample standard deviation "
                  f"(number of seeds). {_bold_rule(group)}")
        header = " & ".join(["Method", "FP", *bits_cols]) + " \\\\"
        lines = [f"% {section}", legend, "\\begin{tabular}{l" + "c" * (1 + len(bits_cols)) + "}", "\\toprule",
                 header, "\\midrule"]
        for row, cells_of_row in _rows(group):
            texts = [_latex_cell(c) if c is not None else "--" for c in _row_cells(cells_of_row, bits_cols)]
            lines.append(" & ".join([_latex_escape(row), *texts]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _latex_cell(cell: pd.Series) -> str:
    text = (f"{cell['mean']:.2f} ({cell['n']})$^\\dagger$" if cell["n"] == 1
            else f"{cell['mean']:.2f} $\\pm$ {cell['std']:.2f} ({cell['n']})")
    return f"\\textbf{{{text}}}" if cell["bold"] else text


def _latex_escape(text: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in text)


# ---------------------------------------------------------------- markdown


def _sections(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The sections of one task's cells, the one with the most runs first."""
    groups = list(table.groupby("section"))
    return sorted(groups, key=lambda item: (-int(item[1]["n"].sum()), item[0]))


def _bits_columns(section: pd.DataFrame) -> list[str]:
    quantized = section[section["quantized"]]
    return list(quantized.sort_values("bits_order")["bits"].drop_duplicates())


def _rows(section: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(row label, its cells), the FP rows first, then by label."""
    return sorted(section.groupby("row"), key=lambda item: (bool(item[1]["quantized"].iloc[0]), item[0]))


def _row_cells(row: pd.DataFrame, bits_cols: list[str]) -> list[pd.Series | None]:
    """The row's cell in the FP column and in each bit-width column (None where it has none)."""
    by_bits = {cell["bits"]: cell for _, cell in row.iterrows()}
    return [by_bits.get(b) for b in ["FP", *bits_cols]]


def _cell_text(cell: pd.Series) -> str:
    """`mean ± s (n) [ci_low, ci_high]`, or `mean (1)†` for a single run; bold when the verdict says so."""
    if cell["n"] == 1:
        text = f"{cell['mean']:.2f} (1)†"
    else:
        text = f"{cell['mean']:.2f} ± {cell['std']:.2f} ({cell['n']}) [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"
    text = f"**{text}**" if cell["bold"] else text
    return f"{text} ⚠" if cell.get("check") else text


def _number(value: float, spec: str) -> str:
    """`value` formatted, or an empty cell where it is missing."""
    return "" if value is None or pd.isna(value) else format(value, spec)


def _bold_rule(section: pd.DataFrame) -> str:
    """The legend of the bold cells: which tests, which correction, at which level, and what a single run can and
    cannot be."""
    rule = (f"Bold, in each bit-width column: the best mean and every cell not significantly different from it. "
            f"Every pair of cells in a column is compared (a paired t-test over the seeds where both ran the same "
            f"seeds, which give every method the same initial weights and data order; {stats.TEST_NAME} where "
            f"they did not; the reference's rows, `torchao-*`, are not ranked), and the column's "
            f"p-values are adjusted together by Holm's method, so that the chance of any false difference in a "
            f"column is at most {stats.ALPHA:g}; bold when the adjusted p >= {stats.ALPHA:g}.")
    if not (section["n"] == 1).any():
        return rule
    return (f"{rule} A single run (n = 1, †) has no interval and cannot be tested: it is bold only when it has "
            "the best mean, and a column whose best cell is a single run has no other bold cell.")


def _decisions(section: pd.DataFrame) -> str:
    """What each bit-width column decides (one sentence each) and the cells to check, with their reasons."""
    quantized = section[section["quantized"]]
    lines = ["What each column decides:", ""]
    for bits in _bits_columns(section):
        decided = quantized[quantized["bits"] == bits]["decision"].dropna()
        if len(decided):
            lines.append(f"- {decided.iloc[0]}")
    flagged = section[section["check"].notna()]
    if len(flagged):
        lines += ["", "Cells to check (⚠: they look wrong next to their neighbours; a reader should look at their "
                      "runs before trusting them):", ""]
        lines += [f"- {cell['row']}, {bits_words(cell['bits'])}: {cell['check']}." for _, cell in flagged.iterrows()]
    return "\n".join(lines)


def _metric_table(section: pd.DataFrame) -> str:
    bits_cols = _bits_columns(section)
    task = section["task"].iloc[0]
    rows = [[f"{row} {BORROWED}" if _borrowed(task, group["method"].iloc[0]) else row,
             *(_cell_text(c) if c is not None else "—" for c in _row_cells(group, bits_cols))]
            for row, group in _rows(section)]
    first = section.iloc[0]
    direction = "higher is better" if first["higher_is_better"] else "lower is better"
    if first["metric_name"] == "perplexity" and first["byte_tokens"]:
        direction += "; with the byte tokenizer a token is one byte, so ln(perplexity) is the loss in nats per byte"
    level, quantile = f"{stats.LEVEL:.0%}", f"{(1 + stats.LEVEL) / 2:g}"
    legend = (f"Final {first['metric_name']} after exact quantization: mean ± sample standard deviation (number "
              f"of seeds) [{level} confidence interval of the mean, Student t: mean ± t({quantile}, n−1)·s/√n]; "
              f"{direction}.")
    return (f"{legend}\n\n{_table(['method', 'FP', *bits_cols], rows)}\n\n{_bold_rule(section)}\n\n"
            f"{_decisions(section)}\n")


def _reference_table(section: pd.DataFrame) -> str:
    """Each reference row (`torchao-X`) against qatbench's X at every bit width where both ran: the difference of
    the means with its interval (paired over the seeds where they pair), the test's p-value Holm-adjusted over
    the table, and whether they differ. Empty where the section has no reference row."""
    cells = {(c["row"], c["bits"]): c for _, c in section.iterrows()}
    pairs = []
    for (row, bits), theirs in cells.items():
        method = theirs["method"]
        if not method.startswith(REFERENCE_PREFIX):
            continue
        ours = cells.get((row.replace(method, method.removeprefix(REFERENCE_PREFIX), 1), bits))
        if ours is not None:
            pairs.append((ours, theirs))
    if not pairs:
        return ""
    tested = {}
    for ours, theirs in pairs:
        test, p = verdicts.compare(verdicts.Cell(ours["row"], ours["values"]),
                                   verdicts.Cell(theirs["row"], theirs["values"]))
        tested[(ours["row"], theirs["row"], ours["bits"])] = (test, p)
    adjusted = stats.holm({k: p for k, (_, p) in tested.items() if p is not None})
    rows = []
    for ours, theirs in pairs:
        key = (ours["row"], theirs["row"], ours["bits"])
        test, p = tested[key]
        common = sorted(set(ours["values"]) & set(theirs["values"]), key=str)
        paired = test == "paired"
        difference = (stats.summarize([ours["values"][s] - theirs["values"][s] for s in common]) if paired else None)
        interval = (f"{difference.mean:+.2f} [{difference.ci_low:+.2f}, {difference.ci_high:+.2f}]" if paired
                    else f"{ours['mean'] - theirs['mean']:+.2f}")
        p_holm = adjusted.get(key)
        verdict = "untested" if p_holm is None else (
            f"differ (p = {p_holm:.3g})" if p_holm < stats.ALPHA else "not told apart")
        rows.append([ours["row"], theirs["row"], ours["bits"], f"{ours['mean']:.2f}", f"{theirs['mean']:.2f}",
                     interval, test, "" if p_holm is None else f"{p_holm:.3g}", verdict])
    return ("\nqatbench against the PARQ authors' reference (`torchao.prototype.parq`, the same rule, settings and "
            "seeds): the difference of the means (qatbench - reference) with its 95% interval where the seeds pair, "
            "the test's p-value Holm-adjusted over this table, and whether they differ (they should not):\n\n"
            + _table(["qatbench", "reference", "bits", "qatbench mean", "reference mean", "difference",
                      "test", "p (Holm)", "verdict"], rows) + "\n")


BORROWED = "⚑"  # a row whose method runs with a setting borrowed from another task or paper, untuned here


def _borrowed(task: str, method: str) -> bool:
    return (hyperparameters(task).get("methods") or {}).get(method, {}).get("source") == "borrowed"


def _hyperparameter_table(section: pd.DataFrame, records: pd.DataFrame) -> str:
    """Per row: its learning rate, its method's settings (every one, defaults included, as its records hold them)
    and where they come from (`tasks/hyperparameters.yaml`); empty where the task has no entry there."""
    task = section["task"].iloc[0]
    known = hyperparameters(task)
    if not known:
        return ""
    methods, recipe = known.get("methods") or {}, known.get("recipe") or {}
    rows = []
    for row, group in _rows(section):
        runs = records[records["row"] == row]
        method = group["method"].iloc[0]
        settings = json.loads(runs["method_config"].iloc[0]) if len(runs) else {}
        lr = sorted({json.loads(c).get("lr") for c in runs["row_config"]} - {None})
        entry = methods.get(method) or {"source": "unknown", "note": "not in tasks/hyperparameters.yaml"}
        label = f"{row} {BORROWED}" if entry.get("source") == "borrowed" else row
        steps = json.loads(runs["row_config"].iloc[0]) if len(runs) else {}
        rows.append([label, ", ".join(f"{x:g}" for x in lr), ", ".join(f"{k}={_value_text(v)}"
                                                                     for k, v in settings.items()) or "-",
                     ", ".join(f"{k}={'recipe' if steps[k] is None else _value_text(steps[k])}"
                               for k in STEP_KEYS if k in steps) or "-",
                     entry.get("source", ""), entry.get("note", "")])
    return (f"\nHyper-parameters of each row and where they come from (`tasks/hyperparameters.yaml`; {BORROWED}: a "
            f"setting borrowed from another task or paper and not tuned here, so the row may understate its method). "
            f"The recipe every row shares ({recipe.get('source', 'unknown')}): {recipe.get('note', '')}.\n\n"
            + _table(["row", "lr", "method settings", "steps (W+A, learned)", "source", "why"], rows) + "\n")


def _delta_table(section: pd.DataFrame) -> str:
    fp = _baseline(section)
    if fp is None:
        return "\nNo full-precision run shares this budget: there is no difference to FP.\n"
    bits_cols = _bits_columns(section)
    rows = [[row, *(_number(c["delta_vs_fp"], "+.2f") if c is not None else "" for c in
                    _row_cells(group, bits_cols)[1:])]
            for row, group in _rows(section) if group["quantized"].iloc[0]]
    which = " (the FP row with the best mean)" if (~section["quantized"]).sum() > 1 else ""
    return (f"\nDifference of each mean to the FP baseline{which} ({fp['row']}: {fp['mean']:.2f}), "
            f"in {fp['metric_name']} points:\n\n" + _table(["method", *bits_cols], rows) + "\n")


def _cost_table(section: pd.DataFrame) -> str:
    cuda = (section["device_type"] == "cuda").any()
    peak_headers = ["peak alloc MB", "peak reserved MB"] if cuda else ["step RSS +MB"]
    rows = []
    for row, group in _rows(section):
        for _, c in group.sort_values("bits_order").iterrows():
            exact = "n/a" if c["exact_checked"] == 0 else f"{c['exact_passed']}/{c['exact_checked']}"
            peaks = [_number(c["peak_mb"], ".0f")] + ([_number(c["peak_reserved_mb"], ".0f")] if cuda else [])
            ratio = _number(c["step_vs_fp"], ".2f")
            rows.append([row, c["bits"], _number(c["step_ms"], ".3f"), ratio and f"{ratio}x",
                         _number(c["train_s"], ".1f"), _number(c["state_mb"], ".2f"), *peaks,
                         _number(c["packed_mb"], ".3f"), exact, _number(c["transition_rate"], ".2e")])
    peak_text = ("peak memory on the GPU during training, max over seeds (`torch.cuda.max_memory_allocated`, and "
                 "`max_memory_reserved` by the caching allocator)") if cuda else (
        "a step's transient memory: the increase of the process's peak resident set size over its level after "
        "its first training step (when the training state exists and the library code is paged in), max over "
        "seeds")
    headers = ["method", "bits", "ms/step", "vs FP", "train s", "state MB", *peak_headers, "packed MB", "exact",
               "transitions"]
    legend = ("Cost, per row and bit width (medians over seeds unless said): steady-state time per training step "
              "(forward + backward + method step) and its ratio to the FP baseline's step; training wall-clock in "
              "seconds; training state in MB (parameters, gradients, optimizer and method state, measured from the "
              f"tensors); {peak_text}; packed size of the exported model in MB; runs whose final weights passed the "
              "exactness check; last-epoch transition rate (fraction of quantized weights changing level per step, "
              "mean over seeds; FP: against 2-bit levels). Empty: not recorded.")
    return f"\n{legend}\n\n{_table(headers, rows)}\n"


def _paper_table(section: pd.DataFrame) -> str:
    known = section[section["paper"].notna()]
    if known.empty:
        return ""
    bits_cols = [b for b in ["FP", *_bits_columns(section)] if b in set(known["bits"])]
    rows = []
    for row, group in _rows(known):
        by_bits = {c["bits"]: c for _, c in group.iterrows()}
        rows.append([row, *(_paper_text(by_bits[b]) if b in by_bits else "" for b in bits_cols)])
    source = "; ".join(paper.get("source", "") for paper in published(section["task"].iloc[0]))
    return (f"\nAgainst the published numbers ({source}): our mean minus the paper's, and whether the paper's mean "
            f"lies inside our {stats.LEVEL:.0%} interval (a single run has none). The paper's budget may differ "
            "from this section's.\n\n" + _table(["method", *bits_cols], rows) + "\n")


def _paper_text(cell: pd.Series) -> str:
    where = {True: "inside", False: "outside", None: "n = 1"}[cell["paper_in_ci"]]
    return f"{cell['delta_vs_paper']:+.2f} ({where}; paper {cell['paper']})"


def _shared_settings(records: pd.DataFrame) -> str:
    """The hyper-parameters that are the same for every row of a section (the varying ones are in row labels)."""
    configs = [json.loads(c) for c in records["row_config"]]
    varying = set(_varying_keys(configs, absent_differs=False))
    values = {k: next((c[k] for c in configs if c.get(k) is not None), None) for k in SHARED_SHOWN if k not in varying}
    return ", ".join(f"{k} {_value_text(v)}" for k, v in values.items() if v is not None)


def _section_intro(records: pd.DataFrame) -> str:
    sizes = ", ".join(str(int(s)) for s in sorted(records["num_test"].dropna().unique()))
    devices = ", ".join(sorted(records["device"].dropna().unique())) or "unknown"
    return (f"Evaluated on {sizes or 'an unknown number of'} test examples; device {devices}. Shared by every row: "
            f"{_shared_settings(records)}; a row label names the settings that differ between rows.\n")


def _figures(task: str, number: int, section: pd.DataFrame, records: pd.DataFrame, plot_dir: Path) -> list[str]:
    """Write the section's figures into `plot_dir` and return their markdown (only those with data)."""
    title = f"{task}, {section['section'].iloc[0]}"
    metric = section["metric_name"].iloc[0]
    level = f"{stats.LEVEL:.0%}"
    figures = [  # (file name part, alt text, caption, drawing function)
        ("bits", f"{metric} against bit width",
         f"error bars: the {level} interval of the mean; FP: a horizontal line with its interval shaded",
         lambda p: metric_vs_bits_plot(section, p, title)),
        ("time", f"{metric} against training time",
         "one panel per bit width: mean and interval against median training wall-clock (equal compute)",
         lambda p: metric_vs_time_plot(section, p, title)),
        ("size", f"{metric} against model size",
         "packed size of the exported model, one line per method through its bit widths; FP at its fp32 size",
         lambda p: metric_vs_size_plot(section, p, title)),
        ("transitions", "transition rate per epoch", "mean over seeds",
         lambda p: transition_rate_plot(records, p, title)),
    ]
    out = []
    for kind, alt, caption, draw in figures:
        name = f"{task}-{kind}-{number}.png"
        if draw(plot_dir / name):
            out.append(f"\n{alt[0].upper()}{alt[1:]} ({caption}):\n\n![{alt}]({name})\n")
    return out


def task_markdown(task: str, frame: pd.DataFrame, regenerate: str, plot_dir: Path | None = None,
                  found: Sequence[Conflict] = ()) -> str:
    """The whole leaderboard page of one task from its records (`records_frame`), listing its conflicts `found`;
    with `plot_dir`, its figures are written there."""
    finished = finished_rows(frame)
    table = cell_frame(finished)
    parts = [f"# {task}\n"]
    for number, (section, group) in enumerate(_sections(table), start=1):
        records = finished[finished["section"] == section]
        parts += [f"## {section}\n", _section_intro(records), _metric_table(group), _reference_table(group),
                  _hyperparameter_table(group, records), _delta_table(group),
                  _cost_table(group), _paper_table(group)]
        if plot_dir is not None:
            parts += _figures(task, number, group, records, plot_dir)
    left_out = frame[~_finished(frame)]
    if len(left_out):
        left_out = left_out.assign(status=left_out["status"].replace("ok", "ok, no metric"))
        counts = ", ".join(f"{s}: {n}" for s, n in left_out["status"].value_counts().items())
        parts.append(f"Runs left out of the tables ({counts}):")
        parts.append(_table(["method", "bits", "seed", "status"],
                            left_out[["method", "bits", "seed", "status"]].astype(str).values.tolist()))
    parts.append(_conflict_section(found))
    parts.append(_reference_section(task))
    parts.append(_provenance(frame, regenerate))
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def _conflict_section(found: Sequence[Conflict]) -> str:
    if not found:
        return ""
    rows = [[c.cell, "; ".join(f"{metric:.4f} ({Path(source).name})" for source, metric in c.entries),
             ", ".join(c.explained_by) or "nothing recorded (unexplained)"] for c in found]
    return ("\n## Conflicts\n\nSeeds of one cell whose records disagree: a finding, not a duplicate. The first "
            "record of each counts in the tables above; every value is listed here.\n\n"
            + _table(["cell and seed", "values (file)", "what differs between them"], rows) + "\n")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _reference_section(task: str) -> str:
    """The papers' own numbers, when `tasks/references.yaml` has them, one table per paper."""
    parts = []
    for paper in published(task):
        if not paper.get("rows"):
            continue
        columns = sorted({str(b) for row in paper["rows"].values() for b in row}, key=label_order)
        rows = [[m, *(str(paper["rows"][m].get(b, "")) for b in columns)] for m in paper["rows"]]
        fp = f"; FP {paper['fp']}" if paper.get("fp") is not None else ""
        parts.append(f"From {paper['source']}{fp}.\n\n" + _table(["method", *columns], rows))
    return "\n### Published numbers (not measured here)\n\n" + "\n\n".join(parts) + "\n" if parts else ""


def _provenance(frame: pd.DataFrame, regenerate: str) -> str:
    commands = sorted(c for c in frame["command"].dropna().unique())
    commits = sorted(c for c in frame["commit"].dropna().unique())
    return (f"\n## Provenance\n\n{len(frame)} run records; qatbench commits {', '.join(commits) or 'unknown'}. "
            "The records were produced by:\n\n```\n" + "\n".join(commands or ["(no command recorded)"])
            + f"\n```\n\nRegenerate this table with:\n\n```\n{regenerate}\n```\n")


def build(records: Sequence[RunRecord], regenerate: str, plot_dir: Path | None = None,
          allow_conflicts: bool = False) -> dict[str, str]:
    """{task name: markdown} for every task present in `records`; with `plot_dir`, figures are written there."""
    if not records:
        raise QatbenchError("no run records found")
    frame = records_frame(records)
    found = checked_conflicts(frame, allow_conflicts)
    return {task: task_markdown(task, group, regenerate, plot_dir, [c for c in found if c.task == task])
            for task, group in frame.groupby("task")}


def index_markdown(records: Sequence[RunRecord], regenerate: str, extra_pages: Sequence[str] = ()) -> str:
    frame = records_frame(records)
    rows = []
    for task, group in frame.groupby("task"):
        rows.append([f"[{task}]({task}.md)", str(len(group)), str(int((group["status"] == "ok").sum())),
                     ", ".join(sorted(group["method"].unique())),
                     ", ".join(b for b in group.sort_values("bits_order")["bits"].drop_duplicates())])
    pages = "".join(f"\nAlso here: [{page}]({page}).\n" for page in extra_pages)
    return ("# qatbench leaderboards\n\nEvery number below comes from a run record in this folder.\n\n"
            + _table(["task", "runs", "ok", "methods", "bits"], rows)
            + f"\n{pages}\nRegenerate with:\n\n```\n{regenerate}\n```\n")


FIGURE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*-(bits|time|size|transitions)-\d+\.png")
"""The names of the figures `write` makes: `<task>-<kind>-<section number>.png`."""


def write(records: Sequence[RunRecord], out_dir: Path, regenerate: str, fmt: str = "md",
          allow_conflicts: bool = False) -> list[Path]:
    """Write one `<task>.<ext>` per task in `fmt`; markdown also writes its figures (when matplotlib is
    installed) and the index `README.md`, and removes the figures of earlier writes that this one did not
    make again (a section or task that is gone). Every file is replaced atomically, never written through a
    link."""
    if fmt not in FORMATS:
        raise QatbenchError(f"unknown leaderboard format {fmt!r}; valid: {', '.join(FORMATS)}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in out_dir.iterdir() if FIGURE_NAME.fullmatch(p.name)}
        if fmt == "md":
            texts = build(records, regenerate, plot_dir=out_dir, allow_conflicts=allow_conflicts)
        else:
            texts = render(records, fmt, regenerate, allow_conflicts)
        paths = []
        for task, text in texts.items():
            path = out_dir / f"{task}.{FORMATS[fmt]}"
            write_text_atomic(path, text)
            paths.append(path)
        if fmt != "md":
            return paths
        figures = {name for text in texts.values() for name in re.findall(r"\]\(([^)]+\.png)\)", text)}
        for stale in before - figures:
            (out_dir / stale).unlink(missing_ok=True)
        index = out_dir / "README.md"
        own = {"README.md", *(f"{t}.md" for t in texts)}
        extra = [p.name for p in sorted(out_dir.glob("*.md")) if p.name not in own]
        write_text_atomic(index, index_markdown(records, regenerate, extra))
    except OSError as err:
        raise QatbenchError(f"cannot write leaderboard into {out_dir}: {err.strerror or err}") from None
    return [*paths, index]
