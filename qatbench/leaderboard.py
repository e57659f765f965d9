"""Run records -> pandas tables -> markdown leaderboards (tabulate).

One markdown file per task; inside it one section per training setting (recipe,
epochs, batch size, LR, quantizer scheme and granularity), so that runs of
different budgets are never averaged together. Each section holds the metric
table (methods x bits, `mean +- std (n)`, the FP baseline, best cell bold), the
difference to FP, the cost table (steady-state ms/step, its ratio to the FP step,
peak memory, exactness), the papers' numbers where the task knows them, and the
commands that produced the records and that regenerate the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .errors import QatbenchError
from .plots import transition_rate_plot
from .quant import bits_label, bits_order, parse_bits
from .task import published
from .results import RunRecord

FP_METHOD = "fp"


def records_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per record, with the columns the tables need."""
    rows = []
    for r in records:
        spec = r.spec
        quantizer = spec.get("quantizer") or {}
        recipe = spec.get("recipe_config", {})
        memory = r.memory or {}
        rows.append({
            "task": r.task, "method": r.method, "bits": bits_label(r.bits), "bits_order": bits_order(r.bits),
            "seed": r.seed, "status": r.status, "metric": r.metric, "metric_name": r.metric_name,
            "higher_is_better": r.higher_is_better,
            "step_ms": (r.timing or {}).get("steady_step_ms"),
            "peak_mb": memory.get("peak_allocated_mb", memory.get("peak_rss_mb")),
            "memory_kind": "GPU allocated" if "peak_allocated_mb" in memory else "peak RSS",
            "exact": (r.exactness or {}).get("passed"),
            "transition_rate": (r.history[-1].get("transition_rate") if r.history else None),
            "transition_series": [h.get("transition_rate") for h in r.history],
            "setting": (f"recipe {spec.get('recipe')}: {recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}, "
                        f"lr {recipe.get('lr')}, {recipe.get('optimizer')}, {spec.get('device_type')}"),
            "quantizer": quantizer,
            "method_config": json.dumps(spec.get("method_config", {}), sort_keys=True),
            "task_config": json.dumps(spec.get("task_config", {}), sort_keys=True),
            "num_test": r.num_test, "command": r.command, "commit": (r.environment or {}).get("git_commit"),
            "device": (r.environment or {}).get("device_name"),
        })
    return pd.DataFrame(rows)


def _variant_labels(frame: pd.DataFrame) -> pd.Series:
    """Row label per record: the method, plus whatever of its configuration varies within the table."""
    labels = frame["method"].copy()
    for method, group in frame.groupby("method"):
        configs = group["method_config"].map(json.loads)
        quantizers = group["quantizer"].map(lambda q: {k: q[k] for k in ("scheme", "granularity") if k in q})
        merged = [{**c, **q} for c, q in zip(configs, quantizers)]
        varying = sorted({k for d in merged for k in d if len({json.dumps(m.get(k)) for m in merged}) > 1})
        if varying:
            labels[group.index] = [f"{method} (" + ", ".join(f"{k}={m.get(k)}" for k in varying) + ")" for m in merged]
    return labels


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan"), len(values)


def _cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} (1)" if n == 1 else f"{mean:.2f} ± {std:.2f} ({n})"


def _bits_columns(frame: pd.DataFrame) -> list[str]:
    quantized = frame[frame["bits"] != "FP"]
    return list(quantized.sort_values("bits_order")["bits"].drop_duplicates())


def section_tables(frame: pd.DataFrame) -> str:
    """The markdown of one setting of one task (all records `ok`)."""
    higher = bool(frame["higher_is_better"].iloc[0])
    metric_name = frame["metric_name"].iloc[0]
    frame = frame.assign(row=_variant_labels(frame))
    stats = {key: _mean_std(g["metric"]) for key, g in frame.groupby(["row", "bits"])}
    bits_cols = _bits_columns(frame)
    fp = frame[frame["method"] == FP_METHOD]
    fp_mean = float(fp["metric"].mean()) if len(fp) else None
    fp_step = float(fp["step_ms"].median()) if len(fp) else None
    rows = sorted(frame["row"].unique(), key=lambda r: (r != FP_METHOD, r))

    best = {}
    for b in bits_cols:
        means = {r: stats[(r, b)][0] for r in rows if (r, b) in stats}
        if means:
            best[b] = (max if higher else min)(means.values())

    metric_rows, delta_rows = [], []
    for r in rows:
        if r == FP_METHOD:
            metric_rows.append([r, _cell(*stats[(r, "FP")])] + ["—"] * len(bits_cols))
            continue
        cells, deltas = [r, "—"], [r]
        for b in bits_cols:
            if (r, b) not in stats:
                cells.append("")
                deltas.append("")
                continue
            mean, std, n = stats[(r, b)]
            text = _cell(mean, std, n)
            cells.append(f"**{text}**" if mean == best[b] else text)
            deltas.append(f"{mean - fp_mean:+.2f}" if fp_mean is not None else "n/a (no fp runs)")
        metric_rows.append(cells)
        delta_rows.append(deltas)

    cost_rows = []
    groups = dict(tuple(frame.groupby(["row", "bits"])))
    for r, b in ((r, b) for r in rows for b in ["FP", *bits_cols] if (r, b) in groups):
        g = groups[(r, b)]
        step = float(g["step_ms"].median())
        ratio = f"{step / fp_step:.2f}x" if fp_step else "n/a"
        exact = g["exact"]
        exact_text = "n/a (FP)" if exact.isna().all() else f"{int((exact == True).sum())}/{len(g)}"  # noqa: E712
        rate = g["transition_rate"].astype(float).mean()
        rate_text = "" if pd.isna(rate) else f"{rate:.2e}"
        cost_rows.append([r, b, f"{step:.3f}", ratio, f"{g['peak_mb'].max():.0f}", exact_text, rate_text])

    direction = "higher is better" if higher else "lower is better"
    out = [
        f"Final {metric_name} after exact quantization, mean ± sample std (number of seeds); {direction}; "
        "best quantized cell per bit width in bold.\n",
        _table(["method", "FP", *bits_cols], metric_rows),
        f"\nDifference to the FP baseline ({'n/a' if fp_mean is None else f'{fp_mean:.2f}'}), in {metric_name} points:\n",
        _table(["method", *bits_cols], delta_rows),
        f"\nCost: median steady-state time per training step (forward + backward + method step), its ratio to the "
        f"fp step of the same setting, peak memory ({frame['memory_kind'].iloc[0]}, max over seeds) and runs "
        "whose final weights passed the exactness check; last-epoch transition rate (fraction of quantized "
        "weights changing level per step, mean over seeds; fp: against 2-bit levels):\n",
        _table(["method", "bits", "ms/step", "vs fp", "peak MB", "exact", "transitions"], cost_rows),
    ]
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _reference_section(task: str) -> str:
    """The papers' own numbers, when `tasks/references.yaml` has them."""
    reference = published(task)
    if not reference.get("rows"):
        return ""
    bits_cols = sorted({b for row in reference["rows"].values() for b in row}, key=lambda b: bits_order(parse_bits(b)))
    rows = [[m, *(reference["rows"][m].get(b, "") for b in bits_cols)] for m in reference["rows"]]
    return (f"\n### Published numbers (not measured here)\n\nFrom {reference['source']}; FP {reference.get('fp')}.\n\n"
            + _table(["method", *bits_cols], rows) + "\n")


def task_markdown(task: str, frame: pd.DataFrame, regenerate: str, plot_dir: Path | None = None) -> str:
    """The whole leaderboard file of one task; with `plot_dir`, transition-rate figures are written there."""
    ok = frame[frame["status"] == "ok"]
    parts = [f"# {task}\n"]
    settings = sorted(ok.groupby("setting"), key=lambda item: (-len(item[1]), item[0]))  # the largest first
    for number, (setting, group) in enumerate(settings, start=1):
        sizes = sorted(group["num_test"].dropna().unique())
        configs = sorted(group["task_config"].unique())
        parts.append(f"## {setting}\n")
        parts.append(f"Task options {', '.join(configs)}; evaluated on {', '.join(str(int(s)) for s in sizes)} "
                     f"test examples; device {', '.join(sorted(group['device'].dropna().unique()))}.\n")
        parts.append(section_tables(group))
        figure = f"{task}-transitions-{number}.png"
        if plot_dir is not None and transition_rate_plot(group, plot_dir / figure, f"{task}, {setting}"):
            parts.append(f"\nTransition rate per epoch, mean over seeds:\n\n![transition rate per epoch]({figure})\n")
    failed = frame[frame["status"] != "ok"]
    if len(failed):
        counts = ", ".join(f"{s}: {n}" for s, n in failed["status"].value_counts().items())
        parts.append(f"\nRuns left out of the tables ({counts}):\n")
        parts.append(_table(["method", "bits", "seed", "status"],
                            failed[["method", "bits", "seed", "status"]].astype(str).values.tolist()))
    parts.append(_reference_section(task))
    commands = sorted(c for c in frame["command"].dropna().unique())
    commits = sorted(c for c in frame["commit"].dropna().unique())
    parts.append("\n## Provenance\n")
    parts.append(f"{len(frame)} run records; qatbench commits {', '.join(commits) or 'unknown'}. "
                 "The records were produced by:\n")
    parts.append("```\n" + "\n".join(commands or ["(no command recorded)"]) + "\n```\n")
    parts.append(f"Regenerate this table with:\n\n```\n{regenerate}\n```\n")
    return "\n".join(parts)


def build(records: Sequence[RunRecord], regenerate: str, plot_dir: Path | None = None) -> dict[str, str]:
    """{task name: markdown} for every task present in `records`."""
    if not records:
        raise QatbenchError("no run records found")
    frame = records_frame(records)
    return {task: task_markdown(task, group, regenerate, plot_dir) for task, group in frame.groupby("task")}


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


def write(records: Sequence[RunRecord], out_dir: Path, regenerate: str) -> list[Path]:
    """Write one `<task>.md` per task (with its figures when matplotlib is installed) and the index `README.md`."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tables = build(records, regenerate, plot_dir=out_dir)
        paths = []
        for task, text in tables.items():
            path = out_dir / f"{task}.md"
            path.write_text(text)
            paths.append(path)
        index = out_dir / "README.md"
        extra = [p.name for p in sorted(out_dir.glob("*.md")) if p.name not in ("README.md", *(f"{t}.md" for t in tables))]
        index.write_text(index_markdown(records, regenerate, extra))
    except OSError as err:
        raise QatbenchError(f"cannot write leaderboard into {out_dir}: {err.strerror or err}") from None
    return [*paths, index]
