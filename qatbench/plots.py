"""Figures for the leaderboards (matplotlib is an optional extra: `pip install qatbench[plot]`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def transition_rate_plot(frame: pd.DataFrame, path: Path, title: str) -> bool:
    """Transition rate per epoch (mean over seeds), one panel per bit width, one line per method.

    Returns False, writing nothing, when matplotlib is not installed or no record has the series.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    quantized_bits = [b for b in frame.sort_values("bits_order")["bits"].drop_duplicates() if b != "FP"]
    panels = quantized_bits or ["FP"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), sharey=True, squeeze=False)
    lines = 0
    for ax, bits in zip(axes[0], panels):
        rows = frame[(frame["bits"] == bits) | (frame["method"] == "fp")]
        for method, group in rows.groupby("method"):
            series = pd.DataFrame(group["transition_series"].tolist()).astype(float)
            if series.empty or series.isna().all().all():
                continue
            mean = series.mean(axis=0)
            style = "--" if method == "fp" else "-"
            label = "fp (2-bit levels)" if method == "fp" else method
            ax.plot(range(1, len(mean) + 1), mean.values, style, label=label)
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
