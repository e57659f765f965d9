import pytest

from qatbench.results import RunRecord, identity_hash, load_records, read_record, write_record


def _record(**changes):
    fields = dict(run_id="abc", spec={"seed": 0}, method="ste", task="t", bits=2, seed=0, status="ok",
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
