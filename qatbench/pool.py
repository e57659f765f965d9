"""A pool of worker processes that outlives any one of them, and that none of them outlives.

Written by hand because the standard pools cannot do either: `concurrent.futures.ProcessPoolExecutor`
declares itself broken and stops every worker when one dies (as the OOM killer's SIGKILL does),
and `multiprocessing.Pool` silently loses the task of a worker that died; neither notices when its
owner is killed. Here the owner hands each worker one task at a time over the worker's own pipe,
so it knows which task a dead worker held: it reports that task's death (`Outcome.died`), starts a
replacement on the same slot, and goes on with the others.

Each worker watches its owner (a thread polling the parent pid): when the owner is gone (killed
with SIGKILL, say), an idle worker exits at once, and a busy one sends itself SIGTERM, which a
run takes as a stop request (it checkpoints at its next step), and exits once its task returns.

Workers ignore SIGINT and the stop signals while idle (a task installs its own handlers): the
owner decides what a stop means for the pool (`stop`: start nothing more and pass the signal on
to the busy workers).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .signals import STOP_SIGNALS

POLL_S = 0.5  # how often the owner looks at its workers and each worker at its owner


@dataclasses.dataclass
class Outcome:
    """What became of one task: its result, the exception it raised, or the exit code of the worker that died
    holding it (negative: the signal that killed it); `started` is what the task reported when it began."""

    item: Any
    result: Any = None
    error: BaseException | None = None
    died: int | None = None
    started: Any = None


def _watch_owner(owner: int, busy: threading.Event) -> None:
    """In a worker: once the owner is gone, exit (after stopping the task under way, if any)."""
    while os.getppid() == owner:
        time.sleep(POLL_S)
    if busy.is_set():
        os.kill(os.getpid(), signal.SIGTERM)  # a run checkpoints at its next step and returns
        while busy.is_set():
            time.sleep(0.1)
    os._exit(0)


def _serve(connection: Any, owner: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A worker's life: take a task, run it, send back what became of it, until told to stop."""
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    busy = threading.Event()
    threading.Thread(target=_watch_owner, args=(owner, busy), daemon=True).start()

    def report(started: Any) -> None:
        connection.send(("started", started))

    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        function, item = task
        busy.set()
        try:
            message = ("result", function(item, report))
        except BaseException as err:  # noqa: BLE001 - every failure of a task is its outcome
            message = ("error", err)
        finally:
            busy.clear()
        try:
            connection.send(message)
        except (BrokenPipeError, OSError):
            return
        except Exception as err:  # an exception that does not pickle: say what it was
            connection.send(("error", RuntimeError(f"{type(message[1]).__name__}: {message[1]} ({err})")))


class _Worker:
    def __init__(self, context: Any, slot: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
        self.slot = slot
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, os.getpid(), initializer, initargs), daemon=False)
        self.process.start()
        child.close()
        self.outcome: Outcome | None = None  # the task it holds
        self.signalled = False  # sent a stop signal for this task


def run_tasks(function: Callable[[Any, Callable[[Any], None]], Any], items: Iterable[Any], workers: int,
              on_outcome: Callable[[Outcome], None], stop_requested: Callable[[], int | None],
              initializer: Callable[..., None] | None = None, slot_args: list[tuple] | None = None,
              forward: int | None = None) -> bool:
    """Run `function(item, report)` for every item on `workers` processes (spawned), calling `on_outcome` for each
    task that started, as it ends. `report(x)` in a task sends `x` to the owner at once (kept as `started`).
    Worker i is started with `initializer(*slot_args[i])`.

    While `stop_requested()` returns a signal number, no more tasks start and the busy workers are sent it every
    POLL_S seconds (a task may start routing stop signals only after the first arrives), or `forward` once when
    given (a launcher that passes it on to its own processes). A Ctrl-C in the owner stops the pool the same way
    (SIGTERM to the workers), then raises KeyboardInterrupt once the busy workers are done. Returns whether
    every item started."""
    context = multiprocessing.get_context("spawn")
    queue = list(items)
    queue.reverse()
    slot_args = slot_args or [()] * workers
    pool = [_Worker(context, i, initializer, slot_args[i]) for i in range(min(workers, len(queue)))]
    interrupted = False
    try:
        while True:
            try:
                signum = stop_requested() or (signal.SIGTERM if interrupted else None)
                if signum is None:
                    for worker in pool:
                        if worker.outcome is None and queue:
                            worker.outcome = Outcome(queue.pop())
                            worker.connection.send((function, worker.outcome.item))
                if not any(w.outcome is not None for w in pool):
                    break
                if signum is not None:
                    for worker in pool:
                        if worker.outcome is not None and worker.process.is_alive() and not (
                                forward and worker.signalled):
                            os.kill(worker.process.pid, forward or signum)
                            worker.signalled = True
                pool = _collect(pool, context, initializer, slot_args, on_outcome)
            except KeyboardInterrupt:
                interrupted = True
    finally:
        for worker in pool:
            _close(worker)
    if interrupted:
        raise KeyboardInterrupt
    return not queue


def _collect(pool: list[_Worker], context: Any, initializer: Callable[..., None] | None, slot_args: list[tuple],
             on_outcome: Callable[[Outcome], None]) -> list[_Worker]:
    """Wait up to POLL_S for messages and deaths; hand each ended task's outcome over; replace dead workers."""
    waiting = {w.connection: w for w in pool} | {w.process.sentinel: w for w in pool}
    for ready in multiprocessing.connection.wait(list(waiting), timeout=POLL_S):
        worker = waiting[ready]
        if ready is worker.connection:
            try:
                kind, value = worker.connection.recv()
            except (EOFError, OSError):
                continue  # the worker died: its sentinel says so
            if kind == "started":
                worker.outcome.started = value
                continue
            outcome, worker.outcome = worker.outcome, None
            outcome.result, outcome.error = (value, None) if kind == "result" else (None, value)
            on_outcome(outcome)
        elif not worker.process.is_alive():
            worker.process.join()
            if worker.outcome is not None:
                worker.outcome.died = worker.process.exitcode
                on_outcome(worker.outcome)
            pool = [w for w in pool if w is not worker] + [_Worker(context, worker.slot, initializer,
                                                                    slot_args[worker.slot])]
            pool.sort(key=lambda w: w.slot)
    return pool


def _close(worker: _Worker) -> None:
    """Tell an idle worker to stop and wait for it; a worker still busy (the owner is being interrupted) is
    stopped by its watch of the owner instead."""
    try:
        worker.connection.send(None)
    except (BrokenPipeError, OSError):
        pass
    worker.process.join(timeout=30 if worker.outcome is None else 0)
    worker.connection.close()
