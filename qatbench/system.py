"""What a run ran on: versions, device, git commit; its peak memory and the bytes of its training state."""

from __future__ import annotations

import gc
import itertools
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

import qatbench

from .sharding import local

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
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


class PeakMemory:
    """Peak memory of a run's training, from `start()` (called once the data is resident) on.

    On CUDA: `torch.cuda.max_memory_allocated` / `max_memory_reserved` since `start()`.
    On CPU: the process's peak resident set size (VmHWM), its increase over the resident
    size at `start()` (`peak_rss_increase_mb`: what training added; the libraries and the
    data set are in the baseline), and its increase over the resident size after the first
    training step (`step_rss_increase_mb`, from `settle()`): by then the training state exists
    (`state_bytes` counts it exactly) and the process has paged in the library code its kernels
    run, about 130 MB of libtorch the first time a process trains, which would otherwise be
    charged to whichever run came first; what remains is a step's transient memory
    (activations, temporaries). Linux lets a process reset the peak mark (`echo 5 >
    /proc/self/clear_refs`), so the peaks belong to this run alone; where it cannot be reset,
    `rss_scope` says they are the process-wide peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_scope = "run"
        self.baseline_rss_mb: float | None = None
        self.settled_rss_mb: float | None = None  # the resident size after the first training step
        self.peak_before_settling_mb: float | None = None

    def _reset_peak(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.rss_scope = "process"

    def start(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()  # what earlier runs of this process left cached is not this run's reserve
            torch.cuda.reset_peak_memory_stats(self.device)
        self._reset_peak()
        self.baseline_rss_mb = _status_mb("VmRSS")

    def settle(self) -> None:
        """After the process's first training step: the CPU level that a step's transient memory is measured
        from (once; later calls do nothing)."""
        if self.settled_rss_mb is not None or self.device.type == "cuda" or self.rss_scope != "run":
            return
        self.peak_before_settling_mb = _peak_rss_mb()
        self._reset_peak()
        self.settled_rss_mb = _status_mb("VmRSS")

    def read(self) -> dict[str, Any]:
        peak_now = _peak_rss_mb()
        peaks = [p for p in (peak_now, self.peak_before_settling_mb) if p is not None]
        peak = max(peaks) if peaks else None
        out: dict[str, Any] = {"peak_rss_mb": peak, "rss_scope": self.rss_scope,
                               "baseline_rss_mb": self.baseline_rss_mb}
        if peak is not None and self.baseline_rss_mb is not None and self.rss_scope == "run":
            out["peak_rss_increase_mb"] = peak - self.baseline_rss_mb
            if peak_now is not None and self.settled_rss_mb is not None:
                out["step_rss_increase_mb"] = max(0.0, peak_now - self.settled_rss_mb)
        if self.device.type == "cuda":
            out["peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
        return out


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of every distinct tensor storage in a nested structure of dicts, lists and tensors."""
    if isinstance(obj, torch.Tensor):
        obj = local(obj)
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def training_state_bytes(model: torch.nn.Module, method: Any) -> dict[str, int]:
    """Bytes of the training state, measured from the tensors, each storage counted once: parameters and
    buffers, gradients (one per trainable parameter, allocated by every backward), the base optimizer's
    state, and the method's own state (latent weights, level tables, index tensors, buffers). Under FSDP: this
    rank's shards."""
    seen: set[int] = set()
    parameters = sum(_tensor_bytes(t, seen) for t in itertools.chain(model.parameters(), model.buffers()))
    gradients = sum(local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optimizer = _tensor_bytes(method.optimizer.state_dict()["state"], seen)
    state = {k: v for k, v in method.state_dict().items() if k != "optimizer"}
    own = _tensor_bytes([state, method.memory_tensors()], seen)
    return {"parameters": parameters, "gradients": gradients, "optimizer": optimizer, "method": own,
            "total": parameters + gradients + optimizer + own}


def _cpu_model() -> str | None:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB, or None where there is none."""
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _peak_rss_mb() -> float | None:
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak
