import json

import pytest

from qatbench.atomic import atomic_path
from qatbench.results import RunRecord, identity_hash, load_records, read_record, write_record


def _record(**changes):
    fields = dict(run_id="abc123def456", spec={"seed": 0}, method="ste", task="t", bits=2, seed=0, status="ok",
                  metric_name="top1", higher_is_better=True, metric=50.0)
    return RunRecord(**{**fields, **changes})


def test_identity_hash_ignores_key_order_and_sees_values():
    assert identity_hash({"a": 1, "b": 2}) == identity_hash({"b": 2, "a": 1})
    assert identity_hash({"a": 1}) != identity_hash({"a": 2})
    assert len(identity_hash({})) == 12


def test_write_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_record(path, _record())
    assert read_record(path) == _record()
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_malformed_records_are_skipped_with_a_warning_naming_the_file(tmp_path):
    write_record(tmp_path / "good.json", _record())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "incomplete.json").write_text('{"status": "ok"}')
    with pytest.warns(UserWarning) as caught:
        records = load_records([tmp_path])
    assert len(records) == 1
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.json" in messages and "incomplete.json" in messages


def test_records_are_strict_json_readable_by_others_and_nan_becomes_null(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, _record(metric=float("nan"), history=[{"train_loss": float("inf")}]))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["metric"] is None and json.loads(text)["history"][0]["train_loss"] is None
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, field", [
    ({"metric": "90.1"}, "'metric' is str"),
    ({"bits": "2"}, "'bits' is str"),
    ({"seed": True}, "'seed' is bool"),
    ({"higher_is_better": 1}, "'higher_is_better' is int"),
    ({"history": {"epoch": 1}}, "'history' is dict"),
    ({"history": [1, 2]}, "'history[0]' is int 1, expected an object"),
    ({"timing": {"steady_step_ms": "fast"}}, "'timing.steady_step_ms' is str"),
    ({"memory": "a lot"}, "'memory' is str"),
    ({"spec": {"recipe_config": "short"}}, "'spec.recipe_config' is str 'short', expected an object"),
    ({"spec": {"quantizer": {"bits": [[2]]}}}, "'spec.quantizer.bits' holds something other than single values"),
    ({"exactness": {"tensors": {"w": {"distinct": "3"}}}}, "'exactness.tensors.w.distinct' is str"),
    ({"environment": {"devices": [{"gpu": 0}]}}, "'environment.devices[0]' is dict"),
    ({"task": "../../outside"}, "field 'task': invalid task name"),
    ({"method": "a/b"}, "field 'method': invalid method name"),
    ({"run_id": "../x"}, "'run_id' is '../x', not 12 hex digits"),
    ({"status": "great"}, "'status' is 'great'"),
    ({"schema": 1}, "'schema' is 1; this qatbench reads schema 2"),
])
def test_a_bad_record_is_skipped_with_a_warning_naming_the_file_and_field(tmp_path, change, field):
    write_record(tmp_path / "good.json", _record())
    data = json.loads(_record(run_id="0123456789ab").to_json())
    (tmp_path / "bad.json").write_text(json.dumps({**data, **change}))
    with pytest.warns(UserWarning) as caught:
        records = load_records([tmp_path])
    assert [r.run_id for r in records] == ["abc123def456"]
    [warning] = [str(w.message) for w in caught]
    assert "bad.json" in warning and field in warning


def test_the_same_run_found_twice_counts_once(tmp_path):
    write_record(tmp_path / "a" / "r.json", _record())
    write_record(tmp_path / "b" / "copy.json", _record())
    with pytest.warns(UserWarning, match="counted once"):
        records = load_records([tmp_path, tmp_path / "a"])  # a copy, and a folder given twice
    assert len(records) == 1


def test_record_names_cannot_leave_the_output_folder(tmp_path):
    from qatbench.errors import QatbenchError
    from qatbench.results import record_path

    assert record_path(tmp_path, "mnist-mlp", "ste", "2", 0, "abc123def456").parent == tmp_path / "mnist-mlp"
    for task, seed, run_id in (("../x", 0, "abc123def456"), ("t", -1, "abc123def456"), ("t", 0, "../../etc")):
        with pytest.raises(QatbenchError):
            record_path(tmp_path, task, "ste", "2", seed, run_id)


def test_a_record_nested_too_deeply_or_too_large_is_skipped(tmp_path):
    write_record(tmp_path / "good.json", _record())
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "huge.json").write_bytes(b" " * (65 * 2**20))
    with pytest.warns(UserWarning) as caught:
        assert [r.run_id for r in load_records([tmp_path])] == ["abc123def456"]
    messages = sorted(str(w.message) for w in caught)
    assert "deep.json: nested too deeply" in messages[0] and "huge.json: larger than 64 MB" in messages[1]
