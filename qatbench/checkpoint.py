"""In-run checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, the method's whole state (its base optimizer, latent
weights, level tables, schedules, generator), the LR scheduler, the transition monitor,
the data iterator's place inside the epoch, every random generator the run draws from
(torch's CPU and CUDA generators, Python's and numpy's, the data and method generators),
the partial epoch's loss sum, the record so far (history, timing) and the run identity.
It is written atomically with `torch.save` and read with `torch.load(weights_only=True)`,
which builds tensors and plain containers only, never arbitrary objects. It carries a digest of
everything it holds (`digest`: BLAKE2b over its structure, every key and value, every tensor's
dtype, shape and bytes), checked before anything is used: a checkpoint damaged on disk (one
flipped bit in a tensor) is refused, and the run starts over instead of resuming into another
result.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import numpy
import torch

from .atomic import atomic_path

FORMAT = 2  # 2: with a digest


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


def digest(value: Any) -> str:
    """BLAKE2b of a checkpoint's content: its structure (dict keys in order, list lengths), every scalar's type
    and value, every tensor's dtype, shape and bytes. Written by hand: no library hashes a nested state dict."""
    hasher = hashlib.blake2b(digest_size=32)
    _feed(hasher, value)
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().reshape(-1).contiguous().cpu()
        hasher.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        hasher.update(memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b"")
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(hasher, key)
            _feed(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(f"S{type(value).__name__}:{value!r};".encode())


def save(path: Path, payload: dict[str, Any]) -> tuple[float, int]:
    """Write `payload` with its digest, atomically; (seconds it took, bytes written). A full disk is said so."""
    start = time.perf_counter()
    content = {"format": FORMAT, **payload}
    try:
        with atomic_path(path) as tmp:
            torch.save({**content, "digest": digest(content)}, tmp)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
        raise OSError(f"cannot write checkpoint {path}: {disk_problem(path, err)}") from None
    return time.perf_counter() - start, path.stat().st_size


def disk_problem(path: Path, err: BaseException) -> str:
    """Why a write into `path`'s folder failed, in words: a full disk is named as such (with what is left)."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno.ENOSPC or free is not None and free < 2**20:
        left = f" ({free / 2**20:.1f} MB free in {path.parent})" if free is not None else ""
        return f"no space left on the device{left}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class Unusable(Exception):
    """A checkpoint that cannot be used: unreadable, of another run or format, or damaged."""


def load(path: Path, run_id: str, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint of run `run_id` at `path`; `Unusable` (saying why) when it is unreadable, of another run or
    format, or does not match its digest. With `mmap`, its tensors are memory-mapped (private pages) and read as
    they are used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a damaged file fails in many ways
        raise Unusable(f"{path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                       ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("run_id") != run_id:
        raise Unusable(f"{path} is not a checkpoint of run {run_id} in format {FORMAT}")
    saved_digest = payload.pop("digest", None)
    if saved_digest != digest(payload):
        raise Unusable(f"{path} does not match its digest: the file is damaged")
    return payload


def header(path: Path) -> dict[str, Any] | None:
    """What a checkpoint says of itself (run, label, position, epochs), read without loading its tensors
    (memory-mapped); None when it cannot be read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        head = {k: payload[k] for k in ("run_id", "label", "epochs", "steps_per_epoch", "position")}
    except Exception:  # unreadable: status reports it as such
        return None
    position = head["position"]
    numbers = [head["epochs"], head["steps_per_epoch"], *(position.get(k) for k in ("epoch", "step"))] \
        if isinstance(position, dict) else []
    if len(numbers) != 4 or not all(type(n) is int for n in numbers) or not isinstance(head["label"], str):
        return None
    return head


def age_s(path: Path) -> float | None:
    """Seconds since the checkpoint at `path` was written, or None if there is none."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None
