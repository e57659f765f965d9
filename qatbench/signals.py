"""Stop requests from the outside: what a cluster scheduler sends before it kills or requeues a job.

SIGTERM (`scancel`, the end of a time limit, `docker stop`), SIGHUP (a closed terminal) and
SIGUSR1 (SLURM's `--signal=USR1@120` warning) do not kill a run: they set a flag that the
training loop reads at its next step boundary, where it writes a checkpoint, records the run
as `interrupted` with its step, and exits with 128 + the signal's number, so that a requeued
job resumes from the checkpoint. Ctrl-C (SIGINT) keeps Python's immediate KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


class StopRequest:
    """The first stop signal received, if any (`signum`)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class Stopped(Exception):
    """Raised by the training loop once it has checkpointed after a stop request."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        where = f"at step {step}; the checkpoint resumes it" if step is not None else \
            "; every started run checkpointed and resumes when the command is run again"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}".replace(" ;", ";"))
        self.signum, self.step = signum, step

    def __reduce__(self) -> tuple[type, tuple[int, int | None]]:  # crosses process boundaries (a pool's workers)
        return Stopped, (self.signum, self.step)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGTERM 143, SIGUSR1 138)."""
    return 128 + signum


@contextlib.contextmanager
def stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Route `signals` into a StopRequest for the duration of the block (main thread only; elsewhere the
    request is never set and the signals keep their handlers), then give them back their handlers."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
