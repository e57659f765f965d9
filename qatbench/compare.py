"""Before and after: the cells of two sets of run records, side by side, with Welch's test of each change.

A cell is (task, section, row, bits) as in the leaderboards (`qatbench.leaderboard`); the row labels are
computed over both sets together, so that the same configuration has the same label on both sides. Only
finished runs (status ok, finite metric) count. This is what a contributor runs before and after a change:
`compare(old_records, new_records)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from . import stats
from .errors import QatbenchError
from .leaderboard import finished_rows, records_frame
from .results import RunRecord

KEYS = ["task", "section", "row", "bits"]
COLUMNS = [*KEYS, "status", "metric_name", "higher_is_better", "old_n", "old_mean", "old_std", "new_n", "new_mean",
           "new_std", "change", "p_value", "significant", "better"]


def compare_frame(old_records: Sequence[RunRecord], new_records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per cell found on either side, with the columns of `COLUMNS`: status "compared" (on both sides),
    "added" (new only) or "removed" (old only); each side's n, mean and sample std; the change (new mean minus
    old); Welch's two-sided p of the change (NaN when either side is a single run); significant (p < 0.05;
    None when untested) and better (the change goes the metric's good way; None unless significant), as Python
    booleans."""
    if not old_records and not new_records:
        raise QatbenchError("no run records found")
    sides = [records_frame(rs).assign(side=side) for side, rs in (("old", old_records), ("new", new_records)) if rs]
    frame = finished_rows(pd.concat(sides, ignore_index=True))
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = [_cell_change(group) for _, group in frame.groupby(KEYS)]
    order = frame.drop_duplicates(KEYS).set_index(KEYS)[["quantized", "bits_order"]]
    table = pd.DataFrame(rows).join(order, on=KEYS).astype({"significant": object, "better": object})
    return table.sort_values(["task", "section", "quantized", "row", "bits_order"], ignore_index=True)[COLUMNS]


def _cell_change(group: pd.DataFrame) -> dict[str, Any]:
    """The old and new summaries of one cell and the test of their difference."""
    first = group.iloc[0]
    summaries = {side: stats.summarize(g["metric"].tolist()) for side, g in group.groupby("side")}
    old, new = summaries.get("old"), summaries.get("new")
    both = old is not None and new is not None
    status = "compared" if both else "added" if new is not None else "removed"
    p_value = stats.welch_p(old, new) if both else None
    significant = None if p_value is None else p_value < stats.ALPHA
    change = new.mean - old.mean if both else math.nan
    higher = bool(first["higher_is_better"])
    return {
        **{k: first[k] for k in KEYS}, "status": status, "metric_name": first["metric_name"],
        "higher_is_better": higher, **_side("old", old), **_side("new", new), "change": change, "p_value": p_value,
        "significant": significant, "better": (change > 0) == higher if significant else None,
    }


def _side(name: str, summary: stats.Summary | None) -> dict[str, Any]:
    if summary is None:
        return {f"{name}_n": 0, f"{name}_mean": math.nan, f"{name}_std": math.nan}
    return {f"{name}_n": summary.n, f"{name}_mean": summary.mean, f"{name}_std": summary.std}


def compare(old_records: Sequence[RunRecord], new_records: Sequence[RunRecord]) -> str:
    """Markdown: per task and section, the cells on both sides (old, new, change, p, verdict), then the cells
    added and removed."""
    table = compare_frame(old_records, new_records)
    legend = ("Per cell (task, training budget, row, bit width), over the finished runs: mean ± sample standard "
              "deviation (number of seeds) of the old and the new records; the change, new minus old; the p-value of "
              f"{stats.TEST_NAME}; significant when p < {stats.ALPHA:g}, and then whether the change is better or "
              "worse for the metric. A side with a single run cannot be tested (n/a).")
    parts = [f"# Comparison: {len(old_records)} old and {len(new_records)} new run records", legend]
    if table.empty:
        return "\n\n".join([*parts, "No finished runs on either side."]) + "\n"
    for (task, section), group in table.groupby(["task", "section"], sort=False):
        parts.append(f"## {task}: {section}")
        parts += _section_tables(group)
    return "\n\n".join(parts) + "\n"


def _section_tables(group: pd.DataFrame) -> list[str]:
    from tabulate import tabulate

    def table(headers: list[str], rows: list[list[str]]) -> str:
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)

    out = []
    both = group[group["status"] == "compared"]
    if len(both):
        rows = [[c["row"], c["bits"], _cell(c, "old"), _cell(c, "new"), f"{c['change']:+.2f}",
                 "n/a" if pd.isna(c["p_value"]) else f"{c['p_value']:.3f}", _verdict(c)] for _, c in both.iterrows()]
        metric = group["metric_name"].iloc[0]
        out.append(table(["method", "bits", f"old {metric}", f"new {metric}", "change", "p", "significant"], rows))
    for status, side, heading in (("added", "new", "Only in the new records (added)"),
                                  ("removed", "old", "Only in the old records (removed)")):
        only = group[group["status"] == status]
        if len(only):
            rows = [[c["row"], c["bits"], _cell(c, side)] for _, c in only.iterrows()]
            out += [f"{heading}:", table(["method", "bits", side], rows)]
    return out


def _cell(cell: pd.Series, side: str) -> str:
    n = int(cell[f"{side}_n"])
    mean = cell[f"{side}_mean"]
    return f"{mean:.2f} (1)" if n == 1 else f"{mean:.2f} ± {cell[f'{side}_std']:.2f} ({n})"


def _verdict(cell: pd.Series) -> str:
    if pd.isna(cell["significant"]):
        return "n/a"
    if not cell["significant"]:
        return "no"
    return "yes, better" if cell["better"] else "yes, worse"
