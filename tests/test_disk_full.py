"""A full disk, for real: a small tmpfs is mounted and filled (where the test may mount one; as root on Linux).
Taking a lock, writing a checkpoint and writing a record each fail with a message that says the disk is full,
leave no half-written or empty file behind, and lose no finished record."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from qatbench.cli import main
from qatbench.errors import QatbenchError
from qatbench.locks import try_lock
from qatbench.results import read_record


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs; `fill(free)` leaves about `free` bytes of it free."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")

    def fill(free: int) -> None:
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        os.ftruncate(fd, max(0, filler.stat().st_size - free))
        os.close(fd)

    yield mount, fill
    subprocess.run(["umount", str(mount)], check=True)


def test_a_lock_on_a_full_disk_is_a_one_line_error_and_leaves_no_lock(small_disk):
    mount, fill = small_disk
    (mount / "runs").mkdir()
    fill(0)
    with pytest.raises(QatbenchError, match="cannot take the lock .*: No space left on device"):
        try_lock(mount / "runs" / "r.lock")
    assert not (mount / "runs" / "r.lock").exists()


def test_a_checkpoint_on_a_full_disk_is_recorded_as_a_full_disk(small_disk, idx_root, isolated_data_env, capsys):
    mount, fill = small_disk
    out = mount / "runs"
    argv = ["run", "--method", "parq", "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke", "--no-download",
            "--data-root", str(idx_root), "--out", str(out)]
    (out / "mnist-mlp").mkdir(parents=True)
    fill(96 * 1024)  # room for a lock and a record, not for a checkpoint (about 300 kB)
    assert main(argv) == 1
    [record_file] = out.rglob("*.json")
    record = read_record(record_file)
    assert record.status == "error" and "cannot write checkpoint" in record.message
    assert "no space left on the device" in record.message, record.message
    assert sorted(p.name for p in (out / "mnist-mlp").iterdir()) == [record_file.name]  # no temporary file left
    (mount / "filler").unlink()
    assert main(argv) == 0 and read_record(record_file).status == "ok"  # with room again, the run is retried
