"""The command line end to end, on IDX files written by the test, and every bad input."""

import json

import pytest

from qatbench.cli import main


def _run_args(idx_root, out, *extra):
    return ["run", "--method", "fp", "parq", "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke",
            "--data-root", str(idx_root), "--no-download", "--out", str(out), *extra]


def test_run_then_leaderboard_end_to_end(idx_root, isolated_data_env, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(_run_args(idx_root, out, "--method-arg", "anneal_end=0.5")) == 0
    records = sorted(out.rglob("*.json"))
    assert [p.name.split("-")[0] for p in records] == ["fp", "parq"]
    parq = json.loads(records[1].read_text())
    assert parq["status"] == "ok" and parq["exactness"]["passed"] is True
    assert parq["spec"]["method_config"]["anneal_end"] == 0.5
    assert parq["command"].startswith("qatbench run --method fp parq")
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "2 runs, 2 ok" in printed

    board = tmp_path / "board"
    assert main(["leaderboard", str(out), "-o", str(board)]) == 0
    text = (board / "mnist-mlp.md").read_text()
    assert "| parq " in text and "| fp " in text and f"qatbench leaderboard {out} -o {board}" in text

    assert main(_run_args(idx_root, out, "--method-arg", "anneal_end=0.5")) == 0
    assert "skipped: record exists" in capsys.readouterr().out


def test_list_shows_methods_tasks_hyper_parameters_and_recipes(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for text in ("parq", "anneal_end: float = 0.75", "fashion-mnist-mlp", "hidden: int = 10", "recipe paper:"):
        assert text in printed


def _error_of(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatbench: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


BASE = ["run", "--task", "mnist-mlp", "--recipe", "smoke", "--no-download"]


@pytest.mark.parametrize("argv, expected", [
    (["run", "--method", "prq", "--task", "mnist-mlp", "--bits", "2"], "did you mean 'parq'"),
    (["run", "--method", "ste", "--task", "fashion-mnist", "--bits", "2"], "did you mean 'fashion-mnist-mlp'"),
    ([*BASE, "--method", "ste", "--bits", "0"], "invalid bits '0'; valid choices: 1..8 or T"),
    ([*BASE, "--method", "ste", "--bits", "9"], "invalid bits '9'"),
    ([*BASE, "--method", "ste", "--bits", "-1"], "invalid bits '-1'"),
    ([*BASE, "--method", "ste", "--bits", "two"], "invalid bits 'two'"),
    ([*BASE, "--method", "ste", "--bits", "2", "--granularity", "chanel"], "did you mean 'channel'"),
    ([*BASE, "--method", "parq", "--bits", "2", "--method-arg", "anneal_ned=0.5"], "did you mean 'anneal_end'"),
    ([*BASE, "--method", "parq", "--bits", "2", "--method-arg", "steepness=steep"], "is not a valid float"),
    ([*BASE, "--method", "ste", "--bits", "2", "--task-arg", "hiden=3"], "did you mean 'hidden'"),
    ([*BASE, "--method", "ste", "--bits", "2", "--seeds", "x"], "seed='x' is not a valid int"),
    (["list", "metods"], "did you mean 'methods'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_a_one_line_error(argv, expected, capsys):
    assert expected in _error_of(argv, capsys)


def test_missing_data_names_every_place_looked(tmp_path, isolated_data_env, capsys, monkeypatch):
    monkeypatch.setattr("qatbench.data.SYSTEM_DATA_DIR", tmp_path / "system")
    err = _error_of([*BASE, "--method", "ste", "--bits", "2", "--out", str(tmp_path / "o")], capsys)
    assert ".cache/qatbench" in err and str(tmp_path / "system") in err and "--data-root" in err


def test_a_given_data_root_without_the_data_is_an_error_not_a_fallback(tmp_path, idx_root, capsys, monkeypatch):
    monkeypatch.setenv("QATBENCH_DATA", str(idx_root))  # the data is elsewhere, but only --data-root counts
    err = _error_of([*BASE, "--method", "ste", "--bits", "2", "--data-root", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "o")], capsys)
    assert f"not found in --data-root '{tmp_path / 'nowhere'}'" in err and str(idx_root) not in err


def test_unwritable_output_folder_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error_of([*BASE, "--method", "ste", "--bits", "2", "--out", str(blocker / "runs")], capsys)
    assert "is not writable" in err


def test_leaderboard_of_mixed_good_and_bad_records_warns_once_per_bad_file(idx_root, isolated_data_env, tmp_path,
                                                                          capsys):
    out = tmp_path / "runs"
    assert main(_run_args(idx_root, out)) == 0
    good = json.loads(sorted(out.rglob("parq-*.json"))[0].read_text())
    (out / "garbage.json").write_text("{")
    (out / "wrong-type.json").write_text(json.dumps({**good, "run_id": "0123456789ab", "metric": "high"}))
    (out / "old-schema.json").write_text(json.dumps({**good, "run_id": "0123456789ac", "schema": 1}))
    (out / "escape.json").write_text(json.dumps({**good, "run_id": "0123456789ad", "task": "../../../tmp/x"}))
    (out / "copy.json").write_text(json.dumps(good))
    capsys.readouterr()
    assert main(["leaderboard", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("qatbench: warning:")]
    assert len(warnings) == 5, captured.err
    for name, why in (("garbage.json", "Expecting"), ("wrong-type.json", "'metric' is str"),
                      ("old-schema.json", "'schema' is 1"), ("escape.json", "invalid task name"),
                      ("copy.json", "counted once")):
        assert any(name in w and why in w for w in warnings), (name, warnings)
    assert "# mnist-mlp" in captured.out and "| parq" in captured.out


def test_leaderboard_of_a_missing_folder_is_an_error(tmp_path, capsys):
    assert "no such file or folder" in _error_of(["leaderboard", str(tmp_path / "none")], capsys)


def test_leaderboard_formats_and_compare_through_the_cli(idx_root, isolated_data_env, tmp_path, capsys):
    import pandas as pd

    old, new = tmp_path / "old", tmp_path / "new"
    assert main(_run_args(idx_root, old, "--seeds", "0", "1")) == 0
    assert main(_run_args(idx_root, new, "--seeds", "0", "1", "--epochs", "2")) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(old), "--format", "csv"]) == 0
    frame = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert set(frame["method"]) == {"fp", "parq"} and (frame["n"] == 2).all()
    assert main(["leaderboard", str(old), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out
    assert main(["leaderboard", str(old), "--format", "json", "-o", str(tmp_path / "board")]) == 0
    assert json.loads((tmp_path / "board" / "mnist-mlp.json").read_text())
    assert main(["leaderboard", str(old), "--format", "html"]) == 2
    capsys.readouterr()
    assert main(["compare", str(old), str(new)]) == 0  # other epochs: other sections, cells added and removed
    printed = capsys.readouterr().out
    assert "added" in printed and "removed" in printed
    assert main(["compare", str(old), str(old), "--format", "csv"]) == 0
    compared = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert (compared["status"] == "compared").all() and (compared["change"] == 0).all()
