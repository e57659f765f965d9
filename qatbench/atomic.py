"""Safe file writes: atomic, and never through a link.

An atomic write goes to a temporary file in the same folder (created exclusively), flushed to
disk, then renamed over the target: a kill at any moment leaves either the old file or the new
one, never a partial one, and a failed write leaves no temporary file behind. The rename
replaces a symbolic link planted at the target instead of writing through it. Files that grow
(logs) are opened with `O_NOFOLLOW`, and the folders qatbench makes inside the folder the user
named (`--out`) are checked not to be links (`own_folder`), so nothing is written outside it.
Files are made readable by other users (0644), as records and leaderboards are shared.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import QatbenchError

FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception, it becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def own_folder(root: Path, name: str) -> Path:
    """`root/name`, made if missing: a folder qatbench owns inside the folder the user named, refused (one line)
    when something planted a symbolic link (or a file) there, which would send every file written into it
    elsewhere."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink() or not folder.is_dir():
        raise QatbenchError(f"refusing to write into {folder}: it is a symbolic link or not a folder (qatbench "
                            "writes only inside the folders it is given)")
    return folder


def open_append(path: Path) -> IO[str]:
    """`path` opened to append text (created 0644 if missing), line-buffered, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise QatbenchError(f"refusing to write through the symbolic link {path}") from None
        raise
    return os.fdopen(fd, "a", buffering=1, newline="")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file of an atomic write (finished or abandoned)."""
    return path.name.startswith(".tmp-")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not every file system lets a folder be opened for it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
