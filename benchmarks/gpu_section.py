"""The GPU section of leaderboard/performance.md, from what benchmarks/gpu.sh wrote into OUT.

    python benchmarks/gpu_section.py OUT > OUT/gpu.md

Run records (OUT/runs): per run its device, compile mode, micro-batch, steady step, training wall-clock and
peak CUDA memory; bench records (OUT/bench): their tables as `qatbench bench` printed them (the step against FP
and against the reference, with spreads and the load average); OUT/pytest-cuda.txt: the CUDA-only tests' summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tabulate import tabulate

from bench_tables import bench_tables  # beside this file
from qatbench.quant import bits_label
from qatbench.results import load_records


def _runs_table(folder: Path) -> str:
    rows = []
    for record in sorted(load_records([folder]), key=lambda r: (r.task, r.spec.get("compile", ""), r.method)):
        timing, memory, environment = record.timing, record.memory, record.environment
        micro, accumulation = environment.get("micro_batch", 0), environment.get("accumulation_steps", 1)
        batch = micro * accumulation * environment.get("world_size", 1)
        rows.append([record.task, record.method, bits_label(record.bits), environment.get("device_name", "?"),
                     record.spec.get("compile", "none"), f"{batch} ({accumulation} x {micro})", record.status,
                     f"{timing.get('steady_step_ms', 0):.2f}", f"{timing.get('train_s', 0):.1f}",
                     _megabytes(memory.get("peak_allocated_mb")), _megabytes(memory.get("peak_reserved_mb"))])
    return tabulate(rows, headers=["task", "method", "bits", "device", "compile", "batch (micro-batches)", "status",
                                   "steady step ms", "train s (warm-up included)", "peak allocated MB",
                                   "peak reserved MB"], tablefmt="github", disable_numparse=True)


def _megabytes(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def main(out: Path) -> str:
    parts = ["## GPU", "", f"Written by `benchmarks/gpu.sh` (records in `{out}`); timing data only (CIFAR-shaped "
             "noise, a sample text corpus).", "", "### Training runs", "", _runs_table(out / "runs")]
    parts += bench_tables(out / "bench")
    tests = out / "pytest-cuda.txt"
    summary = tests.read_text().strip().splitlines()[-1] if tests.exists() and tests.read_text().strip() else "not run"
    parts += ["", "### CUDA-only tests (`pytest -m cuda`)", "", summary, ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
