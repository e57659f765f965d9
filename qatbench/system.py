"""What a run ran on: versions, device, git commit; and its peak memory."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

import qatbench

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


CODE_PATHS = ("qatbench", "methods", "tasks", "pyproject.toml")


def git_commit() -> str | None:
    """The commit of the qatbench checkout, with '-dirty' if its code (not its data, such as
    leaderboard records) differs from that commit; None outside git."""
    source = Path(qatbench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=source, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded with every run."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_model() or platform.machine()
    return {
        "qatbench": qatbench.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "device_type": device.type,
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }


class PeakMemory:
    """Peak memory of one run.

    On CUDA: `torch.cuda.max_memory_allocated` / `max_memory_reserved` since `start()`.
    On CPU: the process's peak resident set size (VmHWM). Linux lets a process reset
    that mark (`echo 5 > /proc/self/clear_refs`), so the figure belongs to this run
    alone; where it cannot be reset, `rss_scope` says it is the process-wide peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_scope = "run"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.rss_scope = "process"

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_rss_mb": _peak_rss_mb(), "rss_scope": self.rss_scope}
        if self.device.type == "cuda":
            out["peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
        return out


def _cpu_model() -> str | None:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def _peak_rss_mb() -> float | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        match = None
    if match is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(match.group(1)) / 1024
