"""Figures for the leaderboards (matplotlib is an optional extra: `pip install qatbench[plot]`).

The metric figures take one section's cells (`leaderboard.cell_frame`: one row per method row and bit width
with `mean`, `ci_low`, `ci_high`, `train_s`, `packed_mb`, `fp32_mb`); the transition figure takes the section's
labelled records. Every function returns False, writing nothing, when matplotlib is not installed or there is
nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_path


def _pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _half_widths(cells: pd.DataFrame) -> np.ndarray:
    """Error bar lengths: the interval's half-width (ci_high - mean), 0 where there is no interval (n = 1)."""
    return (cells["ci_high"] - cells["mean"]).fillna(0.0).to_numpy(dtype=float)


def _colors(cells: pd.DataFrame) -> dict[str, str]:
    """One color per row label, the same in every panel and figure of a section."""
    return {row: f"C{i % 10}" for i, row in enumerate(sorted(cells["row"].unique()))}


def _save(fig: Any, plt: Any, path: Path, title: str) -> bool:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # replaced atomically, never written through a link
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def metric_vs_bits_plot(cells: pd.DataFrame, path: Path, title: str) -> bool:
    """The metric against bit width, one line per quantized row with error bars of its 95 % interval; each FP row
    as a horizontal line with its interval shaded. False when the section has no quantized cell."""
    quantized = cells[cells["quantized"]]
    plt = _pyplot()
    if plt is None or quantized.empty:
        return False
    colors = _colors(cells)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for row, group in quantized.groupby("row"):
        group = group.sort_values("bits_order")
        ax.errorbar(group["bits_order"], group["mean"], yerr=_half_widths(group), marker="o", capsize=3, label=row,
                    color=colors[row])
    for _, fp in cells[~cells["quantized"]].iterrows():
        ax.axhline(fp["mean"], linestyle="--", color=colors[fp["row"]], linewidth=1, label=fp["row"])
        if fp["n"] > 1:
            ax.axhspan(fp["ci_low"], fp["ci_high"], color=colors[fp["row"]], alpha=0.1)
    ticks = quantized[["bits_order", "bits"]].drop_duplicates().sort_values("bits_order")
    ax.set_xticks(ticks["bits_order"], ticks["bits"])
    ax.set_xlabel("bits per weight (T: ternary)")
    ax.set_ylabel(cells["metric_name"].iloc[0])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, plt, path, title)


def metric_vs_time_plot(cells: pd.DataFrame, path: Path, title: str) -> bool:
    """The metric (mean and 95 % interval) against the median training wall-clock in seconds, one panel per bit
    width, one point per row; the FP cells appear in every panel. False when no cell has a training time."""
    timed = cells[cells["train_s"].notna()]
    quantized = timed[timed["quantized"]]
    plt = _pyplot()
    if plt is None or quantized.empty:
        return False
    colors = _colors(cells)
    panels = list(quantized.sort_values("bits_order")["bits"].drop_duplicates())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    fp = timed[~timed["quantized"]]
    for ax, bits in zip(axes[0], panels):
        for row, cell in pd.concat([fp, quantized[quantized["bits"] == bits]]).groupby("row", sort=False):
            ax.errorbar(cell["train_s"], cell["mean"], yerr=_half_widths(cell), capsize=3, linestyle="none",
                        marker="o" if cell["quantized"].iloc[0] else "*", label=row, color=colors[row])
        ax.set_title(f"b = {bits}")
        ax.set_xlabel("training wall-clock (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(cells["metric_name"].iloc[0])
    return _save(fig, plt, path, title)


def metric_vs_size_plot(cells: pd.DataFrame, path: Path, title: str) -> bool:
    """The metric against the packed size of the exported model in MB (log scale), one line per quantized row
    through its bit widths (each point labelled with its bit width); each FP row as a star at the model's fp32
    size where a record knows it. False when no quantized cell has a packed size."""
    sized = cells[cells["quantized"] & cells["packed_mb"].notna()]
    plt = _pyplot()
    if plt is None or sized.empty:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colors = _colors(cells)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for row, group in sized.groupby("row"):
        group = group.sort_values("bits_order")
        ax.errorbar(group["packed_mb"], group["mean"], yerr=_half_widths(group), marker="o", capsize=3, label=row,
                    color=colors[row])
        for _, cell in group.iterrows():
            ax.annotate(cell["bits"], (cell["packed_mb"], cell["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    fp32_mb = cells["fp32_mb"].median()
    if not pd.isna(fp32_mb):
        for row, fp in cells[~cells["quantized"]].groupby("row"):
            ax.errorbar([fp32_mb], fp["mean"], yerr=_half_widths(fp), marker="*", markersize=10, capsize=3,
                        linestyle="none", color=colors[row], label=f"{row} (fp32)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(cells["metric_name"].iloc[0])
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, plt, path, title)


def transition_rate_plot(frame: pd.DataFrame, path: Path, title: str) -> bool:
    """Transition rate per epoch (mean over seeds), one panel per bit width, one line per row; the FP rows (their
    rate against 2-bit levels) dashed in every panel. False when no record has the series."""
    plt = _pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator

    quantized_bits = list(frame[frame["quantized"]].sort_values("bits_order")["bits"].drop_duplicates())
    panels = quantized_bits or ["FP"]
    colors = _colors(frame)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), sharey=True, squeeze=False)
    lines = 0
    for ax, bits in zip(axes[0], panels):
        rows = frame[(frame["bits"] == bits) | ~frame["quantized"]]
        for row, group in rows.groupby("row"):
            series = pd.DataFrame(group["transition_series"].tolist()).astype(float)
            if series.empty or series.isna().all().all():
                continue
            mean = series.mean(axis=0)
            quantized = bool(group["quantized"].iloc[0])
            ax.plot(range(1, len(mean) + 1), mean.values, "-" if quantized else "--", color=colors[row],
                    label=row if quantized else f"{row} (2-bit levels)")
            lines += 1
        ax.set_title(f"b = {bits}" if bits != "FP" else "full precision")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if lines == 0:  # records without transition series (written before they were recorded)
        plt.close(fig)
        return False
    axes[0][0].set_ylabel("transition rate (per step)")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, plt, path, title)
