"""What a run shows while it trains: progress inside an epoch, and per-step logs.

Progress: on a terminal, a tqdm bar per epoch; otherwise (a log file, a cluster job) a line
every `interval_s` seconds with the step, the loss, steps per second and the time left.
Reading the loss waits for the device, so it happens only when a line is printed.

Step logs (`--log csv`, `--log tensorboard`): the loss and learning rate of every step
and the method's diagnostics every `FLUSH_STEPS` steps; TensorBoard also gets each epoch's
summary as the record holds it (`epoch/top1`, `epoch/transition_rate`, ...). Losses are kept on the device and
read once per flush. The CSV file (`<record>.steps.csv`) and the TensorBoard folder
(`<record>.tb/`) sit beside the record; a resumed run appends to them. The JSON record
stays the source of truth.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic import open_append, own_folder
from .errors import QatbenchError

LOG_KINDS = ("csv", "tensorboard")
FLUSH_STEPS = 50


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress inside epochs: a tqdm bar on a terminal, else a line every `interval_s` seconds (0: none)."""

    def __init__(self, label: str, total_steps: int, interval_s: float, log: Callable[[str], None],
                 terminal: bool | None = None) -> None:
        self.label, self.total_steps, self.interval_s, self.log = label, total_steps, interval_s, log
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar: Any = None
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.last_line = self.started

    def begin_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if self.terminal and self.interval_s > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=done, desc=f"{self.label} epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, loss: torch.Tensor) -> None:
        """After optimizer step `step` (counted from the start of training) with this batch's `loss`."""
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.interval_s <= 0 or now - self.last_line < self.interval_s:
            return
        self.last_line = now
        rate = (step - self.first_step) / max(now - self.started, 1e-9)
        left = (self.total_steps - step) / rate if rate > 0 else float("nan")
        self.log(f"[{self.label}] step {step}/{self.total_steps} loss {loss.item():.4f} {rate:.1f} steps/s "
                 f"ETA {_duration(left) if left == left else '?'}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepLog:
    """Per-step loss and learning rate, and the method's diagnostics at every flush, to CSV and/or TensorBoard."""

    def __init__(self, kinds: tuple[str, ...], stem: Path) -> None:
        """Open the logs beside the record `stem` now, before training (never through a planted link)."""
        self.kinds, self.stem = kinds, stem
        self.pending: list[tuple[int, int, torch.Tensor, float]] = []
        self.csv_writer: Any = None
        self.columns: list[str] = []
        self.writer: Any = None
        path = stem.with_suffix(".steps.csv")
        self.csv_fresh = "csv" in kinds and not path.exists()
        self.csv_file = open_append(path) if "csv" in kinds else None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QatbenchError("--log tensorboard needs tensorboard: pip install 'qatbench[logs]'") from None
            self.writer = SummaryWriter(log_dir=str(own_folder(stem.parent, stem.with_suffix(".tb").name)))

    def record(self, step: int, epoch: int, loss: torch.Tensor, lr: float, diagnostics: Callable[[], dict]) -> None:
        self.pending.append((step, epoch, loss.detach(), lr))
        if len(self.pending) >= FLUSH_STEPS:
            self.flush(diagnostics())

    def flush(self, diagnostics: dict[str, float]) -> None:
        """Write the pending steps (one read of the device); `diagnostics` go with the last of them."""
        if not self.pending:
            return
        losses = torch.stack([loss for _, _, loss, _ in self.pending]).float().tolist()
        rows = [{"step": step, "epoch": epoch + 1, "loss": value, "lr": lr}
                for (step, epoch, _, lr), value in zip(self.pending, losses)]
        rows[-1].update({k: v for k, v in diagnostics.items() if isinstance(v, (int, float))})
        self.pending = []
        if "csv" in self.kinds:
            self._write_csv(rows)
        if self.writer is not None:
            for row in rows:
                for key, value in row.items():
                    if key not in ("step", "epoch"):
                        self.writer.add_scalar(f"train/{key}", value, row["step"])
            self.writer.flush()

    def epoch(self, step: int, summary: dict[str, Any]) -> None:
        """An epoch's summary as the record holds it (its metric, loss, transition rate, the method's schedule
        values), under `epoch/` in TensorBoard at the step where the epoch ended."""
        if self.writer is None:
            return
        for key, value in summary.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        if self.csv_writer is None:
            self.columns = ["step", "epoch", "loss", "lr", *sorted({k for r in rows for k in r} - {"step", "epoch",
                                                                                                 "loss", "lr"})]
            self.csv_writer = csv.DictWriter(self.csv_file, fieldnames=self.columns, extrasaction="ignore")
            if self.csv_fresh:
                self.csv_writer.writeheader()
        self.csv_writer.writerows(rows)
        self.csv_file.flush()

    def close(self, diagnostics: dict[str, float]) -> None:
        self.flush(diagnostics)
        if self.csv_file is not None:
            self.csv_file.close()
        if self.writer is not None:
            self.writer.close()
