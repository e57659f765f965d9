"""The data's fingerprint: content, not place or time, and never a stale cached one."""

from __future__ import annotations

import os

from qatbench.fingerprint import fingerprint


def test_an_edit_that_puts_the_old_modification_time_back_is_seen(isolated_data_env, tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 1000)
    before = fingerprint(tmp_path, [data])
    stat = data.stat()
    data.write_bytes(b"b" * 1000)  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time
    assert fingerprint(tmp_path, [data]).fingerprint != before.fingerprint  # hashed again: its ctime changed
    assert fingerprint(tmp_path, [data]).fingerprint == fingerprint(tmp_path, [data]).fingerprint


def test_a_copy_elsewhere_is_the_same_data(isolated_data_env, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "x.bin").write_bytes(b"same bytes")
    assert fingerprint(tmp_path / "a", [tmp_path / "a" / "x.bin"]).fingerprint == \
        fingerprint(tmp_path / "b", [tmp_path / "b" / "x.bin"]).fingerprint
