"""A test plugin (`--plugin tests/plugins/stall.py`): the run stops before optimizer step
$QATBENCH_TEST_STALL_STEP of this process, adds a line "PID STEP" to the file $QATBENCH_TEST_STALL_FILE, and waits
there until the file $QATBENCH_TEST_STALL_FILE.release exists (or forever), so that a test can
signal or kill the process at a known step in the middle of an epoch."""

import os
import time
from pathlib import Path

import qatbench.loop as loop

_stall_step = int(os.environ["QATBENCH_TEST_STALL_STEP"])
_marker = Path(os.environ["QATBENCH_TEST_STALL_FILE"])
_train_step = loop.train_step
_steps = 0


def _stalling_train_step(*args, **kwargs):
    global _steps
    if _steps == _stall_step:
        with open(_marker, "a") as marker:
            marker.write(f"{os.getpid()} {_steps}\n")
        release = _marker.with_name(_marker.name + ".release")
        while not release.exists():
            time.sleep(0.01)
    _steps += 1
    return _train_step(*args, **kwargs)


loop.train_step = _stalling_train_step
