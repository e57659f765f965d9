"""Run locks: one owner at a time, stale locks of dead processes reclaimed, other hosts' locks reported."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from qatbench.locks import held_by_live_process, read_lock, try_lock


def test_a_lock_is_taken_once_and_released(tmp_path):
    path = tmp_path / "run.lock"
    lock = try_lock(path)
    assert lock is not None and held_by_live_process(path)
    info = read_lock(path)
    assert (info.host, info.pid) == (socket.gethostname(), os.getpid())
    assert try_lock(path) is None  # a second owner, even in the same process, is refused
    lock.release()
    assert not path.exists()
    with try_lock(path) as again:
        assert again is not None
    assert not path.exists()


def test_the_lock_of_a_killed_process_on_this_host_is_reclaimed(tmp_path):
    path = tmp_path / "run.lock"
    script = (f"import pathlib, time; from qatbench.locks import try_lock; assert try_lock(pathlib.Path({str(path)!r}));"
              " print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert try_lock(path) is None  # alive: not ours
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_lock(path).pid == holder.pid  # the dead process's lock is still there...
    lock = try_lock(path)  # ...and taken over
    assert lock is not None and read_lock(path).pid == os.getpid()
    lock.release()


def test_a_lock_of_another_host_is_left_alone_and_its_age_is_known(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}))
    old = time.time() - 3 * 3600
    os.utime(path, (old, old))
    assert try_lock(path) is None
    info = read_lock(path)
    assert info.host == "node-17" and 3 * 3600 - 60 < info.age_s < 3 * 3600 + 60
    assert "held by node-17 pid 4242" in info.describe()
