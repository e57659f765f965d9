"""What data a run used: a fingerprint of its files, part of the run's identity.

`content` mode (data up to `CONTENT_LIMIT_BYTES` in up to `CONTENT_LIMIT_FILES` files):
SHA-256 over every file's path relative to the data's root, its size and its bytes.
`listing` mode (ImageNet-size folders, where reading every byte would take an hour):
SHA-256 over the sorted relative paths and sizes. Neither depends on where the data
lies or on modification times, so a copy of the same files elsewhere is the same data.

Hashing is cached under `~/.cache/qatbench/fingerprints/`, keyed by each file's absolute path,
size, modification time, inode and status-change time (ctime), so unchanged data is hashed once.
The ctime is what makes the cache sound: an edit that puts the old modification time back
(`touch -d`, `os.utime`, a copy that preserves times) still sets the ctime to the time of the
change, and no program can set it back, so the edited data is hashed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .atomic import write_text_atomic
from .data import default_cache_dir
from .errors import QatbenchError

CONTENT_LIMIT_BYTES = 4 * 2**30
CONTENT_LIMIT_FILES = 100_000
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a record says of its data."""

    path: str  # the resolved folder or file the data was read from
    fingerprint: str  # "<mode>:<first 16 hex digits of the SHA-256>"
    files: int
    bytes: int

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _stat(root: Path, files: Sequence[Path]) -> list[tuple[str, int, tuple[int, int, int], Path]]:
    """(path relative to root, size, (mtime_ns, inode, ctime_ns), path) of every file, sorted by relative path."""
    rows = []
    for file in files:
        try:
            stat = file.stat()
        except OSError as err:
            raise QatbenchError(f"cannot read data file {file}: {err.strerror or err}") from None
        relative = file.relative_to(root).as_posix() if file != root and root in file.parents else file.name
        rows.append((relative, stat.st_size, (stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns), file))
    return sorted(rows)


def _content_digest(rows: list[tuple[str, int, tuple[int, int, int], Path]]) -> str:
    digest = hashlib.sha256()
    for relative, size, _, path in rows:
        digest.update(f"{relative}\0{size}\0".encode())
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(chunk)
        except OSError as err:
            raise QatbenchError(f"cannot read data file {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def _listing_digest(rows: list[tuple[str, int, tuple[int, int, int], Path]]) -> str:
    digest = hashlib.sha256()
    for relative, size, _, _ in rows:
        digest.update(f"{relative}\0{size}\n".encode())
    return digest.hexdigest()


def fingerprint(root: Path, files: Sequence[Path]) -> Fingerprint:
    """The fingerprint of `files` (the data of one task, found in `root`), from the cache when unchanged."""
    if not files:
        raise QatbenchError(f"no data files found in {root}")
    rows = _stat(root, files)
    total = sum(size for _, size, _, _ in rows)
    mode = "content" if total <= CONTENT_LIMIT_BYTES and len(rows) <= CONTENT_LIMIT_FILES else "listing"
    key = hashlib.sha256(json.dumps([mode, [(str(p.resolve()), s, *times) for _, s, times, p in rows]]).encode()
                         ).hexdigest()
    cache = default_cache_dir() / "fingerprints" / f"{key[:32]}.json"
    digest = _cached(cache)
    if digest is None:
        digest = _content_digest(rows) if mode == "content" else _listing_digest(rows)
        try:
            write_text_atomic(cache, json.dumps({"digest": digest}))
        except OSError:
            pass  # a read-only home only costs hashing again next time
    return Fingerprint(path=str(root), fingerprint=f"{mode}:{digest[:16]}", files=len(rows), bytes=total)


def _cached(cache: Path) -> str | None:
    """The cached digest, or None when there is none or it is not a well-formed entry."""
    try:
        entry = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    digest = entry.get("digest") if isinstance(entry, dict) else None
    if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


def files_under(folder: Path) -> list[Path]:
    """Every regular file below `folder` (following no symlinked folders), in a stable order."""
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs.sort()
        found.extend(Path(directory) / n for n in sorted(names))
    return found
