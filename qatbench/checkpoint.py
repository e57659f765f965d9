"""In-run checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, the method's whole state (its base optimizer, latent
weights, level tables, schedules, generator), the LR scheduler, the transition monitor,
the data iterator's place inside the epoch, every random generator the run draws from
(torch's CPU and CUDA generators, Python's and numpy's, the data and method generators),
the partial epoch's loss sum, the record so far (history, timing) and the run identity.
It is written atomically with `torch.save` and read with `torch.load(weights_only=True)`,
which builds tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy
import torch

from .atomic import atomic_path

FORMAT = 1


def random_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The states of the global generators and of `generators`, as tensors and plain values."""
    numpy_state = numpy.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": _plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(numpy.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_random_states(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what `random_states` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    numpy.random.set_state({"bit_generator": "MT19937",
                            "state": {"key": saved["key"].numpy().astype(numpy.uint32), "pos": saved["pos"]},
                            "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (what `weights_only` loading round-trips most simply)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def save(path: Path, payload: dict[str, Any]) -> tuple[float, int]:
    """Write `payload` atomically; (seconds it took, bytes written)."""
    start = time.perf_counter()
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return time.perf_counter() - start, path.stat().st_size


def load(path: Path, run_id: str, mmap: bool = False) -> dict[str, Any] | None:
    """The checkpoint of run `run_id` at `path`, or None (with a warning) when it cannot be used. With `mmap`,
    its tensors are memory-mapped (private pages) and read as they are used: a rank of a sharded run reads its
    own shards, not every rank's."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a damaged file fails in many ways; the run then starts over
        warnings.warn(f"ignoring the unreadable checkpoint {path} ({type(err).__name__}: {err}); starting over",
                      stacklevel=2)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("run_id") != run_id:
        warnings.warn(f"ignoring the checkpoint {path}: it is not a checkpoint of run {run_id}", stacklevel=2)
        return None
    return payload


def header(path: Path) -> dict[str, Any] | None:
    """What a checkpoint says of itself (run, label, position, epochs), read without loading its tensors
    (memory-mapped); None when it cannot be read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {k: payload[k] for k in ("run_id", "label", "epochs", "steps_per_epoch", "position")}
    except Exception:  # unreadable: status reports it as such
        return None


def age_s(path: Path) -> float | None:
    """Seconds since the checkpoint at `path` was written, or None if there is none."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None
