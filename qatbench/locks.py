"""Per-run locks, so that several `qatbench run`/`sweep` processes can share one `--out`.

A lock is a file beside the run's record, created atomically (`O_CREAT | O_EXCL`, which
network file systems honour too) and holding the owner's host, pid and start time. While
it holds the lock, the owner also holds an advisory `flock` on the file, which the kernel
releases when the process dies, however it dies: a lock left by a dead process on this
host is therefore recognised without guessing from pids, and taken over in place (the
file is rewritten, never deleted, so two processes cannot both reclaim it). A lock
written by another host cannot be judged by its flock; it is judged by its age instead: a
thread of the owner refreshes the file's modification time every HEARTBEAT_S seconds while it
holds the lock, so the age is the time since the owner last showed a sign of life, and a lock
older than ABANDONED_AFTER_S has lost its owner. `fcntl.flock` exists on every POSIX system; written
by hand because no maintained library offers this create-or-reclaim protocol.

A lock is never opened through a symbolic link (`O_NOFOLLOW`): a link planted at a run's
lock path is refused with a one-line error, and the file it points to is left alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import QatbenchError

STALE_AFTER_S = 24 * 3600.0  # a lock of another host untouched this long is reported as probably stale
UNWRITTEN_GRACE_S = 60.0  # an empty lock file this old lost its creator between creating and writing it
HEARTBEAT_S = 30.0  # a held lock's modification time is refreshed this often, whatever its owner is doing
ABANDONED_AFTER_S = 10 * HEARTBEAT_S  # a lock without a heartbeat for this long has lost its owner


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds a lock, as written in the lock file."""

    host: str
    pid: int
    started: str
    age_s: float  # seconds since the owner last refreshed the lock

    def describe(self) -> str:
        return f"held by {self.host} pid {self.pid} since {self.started} (last sign of life {self.age_s:.0f} s ago)"


class RunLock:
    """A held lock, its heartbeat beating (a thread refreshes its modification time every HEARTBEAT_S, so that
    anyone can tell a lock whose owner is gone, on any host, from its age); release it when done (or use it as a
    context manager)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        self._released = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self._released.wait(HEARTBEAT_S):
            touch(self.path)

    def release(self) -> None:
        if self.fd < 0:
            return
        self._released.set()
        try:
            if _same_file(self.path, self.fd):
                self.path.unlink()
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.lstat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _open(path: Path, flags: int) -> int:
    """`os.open` of a lock file, never through a symbolic link."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise QatbenchError(f"refusing the lock {path}: it is a symbolic link (to "
                                f"{os.readlink(path)!r}); delete it") from None
        raise


def _write_owner(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_owner()).encode(), 0)
    os.fsync(fd)


def touch(path: Path) -> None:
    """Refresh a lock's modification time (its owner's sign of life), if the lock exists."""
    try:
        os.utime(path, follow_symlinks=False)
    except OSError:
        pass


def read_lock(path: Path) -> LockInfo | None:
    """Who holds the lock at `path`, or None if there is no readable lock there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096).decode()
        age = time.time() - os.fstat(fd).st_mtime
        owner = json.loads(text)
        return LockInfo(str(owner["host"]), int(owner["pid"]), str(owner["started"]), age)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)


def held_by_live_process(path: Path) -> bool:
    """Whether a process (on this host) holds the lock at `path`: its flock cannot be taken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def try_lock(path: Path, attempts: int = 3) -> RunLock | None:
    """The lock at `path`, or None if another live process holds it (or another host, as far as one can tell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        try:
            fd = _open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
        except FileExistsError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only for a reclaimer that looked at the new file, briefly
            try:
                _write_owner(fd)
            except OSError as err:  # a full disk: leave no empty lock behind
                path.unlink(missing_ok=True)
                os.close(fd)
                raise QatbenchError(f"cannot take the lock {path}: {err.strerror or err}") from None
            return RunLock(path, fd)
        reclaimed = _reclaim(path)
        if reclaimed is not None:
            return reclaimed
        if path.exists():
            return None
    return None


def _reclaim(path: Path) -> RunLock | None:
    """Take over the lock at `path` if its owner was on this host and is gone; None otherwise."""
    try:
        fd = _open(path, os.O_RDWR)
    except FileNotFoundError:
        return None  # released meanwhile: the caller tries to create it again
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # a live process on this host holds it
    info = read_lock(path)
    unwritten_and_old = info is None and time.time() - os.fstat(fd).st_mtime > UNWRITTEN_GRACE_S
    if not unwritten_and_old and (info is None or info.host != socket.gethostname()) or not _same_file(path, fd):
        os.close(fd)  # being written, another host's, or replaced meanwhile
        return None
    try:
        _write_owner(fd)  # its owner died on this host (its flock is gone): the lock is ours now
    except OSError as err:
        os.close(fd)
        raise QatbenchError(f"cannot take the lock {path}: {err.strerror or err}") from None
    return RunLock(path, fd)
