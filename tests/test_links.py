"""Nothing is written through a link that someone planted where qatbench writes: a lock, a log, a record, a task
folder, a leaderboard page. Each case plants the link to a file outside the results folder, runs the real command,
and checks that the file is untouched and the command either refused in one line or replaced the link."""

from __future__ import annotations

import pytest

from qatbench.cli import main
from qatbench.executors import output_to
from qatbench.results import load_records

ARGV = ["run", "--method", "ste", "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke", "--no-download"]
SECRET = "precious contents\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def _first_run(idx_root, out) -> str:
    """Run once (to learn the record's name), remove what it wrote; the record's stem."""
    assert main([*ARGV, "--data-root", str(idx_root), "--out", str(out)]) == 0
    [record] = out.rglob("*.json")
    for path in record.parent.iterdir():
        path.unlink()
    return str(record.with_suffix(""))


def _refused(capsys, argv, what):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatbench: error: ") and err.count("\n") == 1 and what in err, err


@pytest.mark.parametrize("suffix, extra, what", [
    (".lock", [], "it is a symbolic link"),
    (".steps.csv", ["--log", "csv"], "refusing to write through the symbolic link"),
])
def test_a_link_at_a_runs_lock_or_log_is_refused(suffix, extra, what, victim, idx_root, isolated_data_env,
                                                 tmp_path, capsys):
    out = tmp_path / "runs"
    stem = _first_run(idx_root, out)
    (out / "mnist-mlp" / f"{stem.rsplit('/', 1)[1]}{suffix}").symlink_to(victim)
    _refused(capsys, [*ARGV, "--data-root", str(idx_root), "--out", str(out), *extra], what)
    assert victim.read_text() == SECRET


def test_a_link_at_a_tensorboard_folder_is_refused(victim, idx_root, isolated_data_env, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "runs"
    stem = _first_run(idx_root, out)
    (out / "mnist-mlp" / f"{stem.rsplit('/', 1)[1]}.tb").symlink_to(victim.parent, target_is_directory=True)
    _refused(capsys, [*ARGV, "--data-root", str(idx_root), "--out", str(out), "--log", "tensorboard"],
             "it is a symbolic link or not a folder")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def test_a_link_at_a_task_folder_is_refused(victim, idx_root, isolated_data_env, tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "mnist-mlp").symlink_to(victim.parent, target_is_directory=True)
    _refused(capsys, [*ARGV, "--data-root", str(idx_root), "--out", str(out)], "refusing to write into")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def test_a_link_at_a_record_is_replaced_not_written_through(victim, idx_root, isolated_data_env, tmp_path):
    out = tmp_path / "runs"
    stem = _first_run(idx_root, out)
    record = out / "mnist-mlp" / f"{stem.rsplit('/', 1)[1]}.json"
    record.symlink_to(victim)
    assert main([*ARGV, "--data-root", str(idx_root), "--out", str(out)]) == 0
    assert not record.is_symlink() and load_records([record])[0].status == "ok" and victim.read_text() == SECRET


def test_a_link_at_a_pool_runs_output_log_is_refused(victim, tmp_path):
    log = tmp_path / "run.log"
    log.symlink_to(victim)
    with pytest.raises(Exception, match="refusing to write through the symbolic link"):
        with output_to(log):
            print("a line that must not reach the victim")
    assert victim.read_text() == SECRET


def test_a_link_at_a_leaderboard_page_is_replaced(victim, idx_root, isolated_data_env, tmp_path):
    out = tmp_path / "runs"
    assert main([*ARGV, "--data-root", str(idx_root), "--out", str(out)]) == 0
    board = tmp_path / "board"
    board.mkdir()
    (board / "mnist-mlp.md").symlink_to(victim)
    (board / "README.md").symlink_to(victim)
    assert main(["leaderboard", str(out), "-o", str(board)]) == 0
    assert victim.read_text() == SECRET and "# mnist-mlp" in (board / "mnist-mlp.md").read_text()
