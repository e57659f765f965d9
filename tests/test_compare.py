import math

import pytest

from qatbench import stats
from qatbench.compare import compare, compare_frame
from qatbench.errors import QatbenchError
from tests.test_leaderboard import SPEC, _record, _records

OWN_LR = {"recipe_config": {**SPEC["recipe_config"], "lr": 0.01}}

OLD = [
    *_records("fp", None, [90.0, 90.5, 91.0]),
    *_records("ste", 2, [80.0, 80.5, 81.0]),  # clearly improved in NEW
    *_records("parq", 2, [84.0, 85.0, 86.0]),  # unchanged within the noise
    _record("talr", 2, 0, 70.0),  # a single run
    *_records("fogzo", 2, [75.0, 76.0]),  # removed
]
NEW = [
    *_records("fp", None, [90.2, 90.6, 91.1]),
    *_records("ste", 2, [84.0, 84.5, 85.0]),
    *_records("parq", 2, [84.5, 85.0, 86.0]),
    *_records("talr", 2, [71.0, 72.0]),
    *_records("binaryrelax", 2, [83.0, 84.0]),  # added
]


def _cells():
    return compare_frame(OLD, NEW).set_index(["row", "bits"])


def test_a_clear_change_is_significant_and_better():
    ste = _cells().loc[("ste", "2")]
    assert ste["status"] == "compared" and ste["change"] == pytest.approx(4.0)
    assert (ste["old_n"], ste["new_n"], ste["old_mean"], ste["new_mean"]) == (3, 3, 80.5, 84.5)
    expected = stats.welch_p(stats.summarize([80.0, 80.5, 81.0]), stats.summarize([84.0, 84.5, 85.0]))
    assert ste["p_value"] == pytest.approx(expected) and ste["p_value"] < 0.05
    assert ste["significant"] is True and ste["better"] is True


def test_a_change_inside_the_noise_is_not_significant():
    parq = _cells().loc[("parq", "2")]
    assert parq["change"] == pytest.approx(0.5 / 3) and parq["p_value"] > 0.05
    assert parq["significant"] is False and parq["better"] is None


def test_a_single_run_on_either_side_cannot_be_tested():
    talr = _cells().loc[("talr", "2")]
    assert talr["status"] == "compared" and talr["change"] == pytest.approx(1.5)
    assert math.isnan(talr["p_value"]) and talr["significant"] is None and talr["better"] is None


def test_cells_on_one_side_only_are_added_or_removed():
    cells = _cells()
    assert cells.loc[("binaryrelax", "2"), "status"] == "added" and cells.loc[("binaryrelax", "2"), "old_n"] == 0
    assert cells.loc[("fogzo", "2"), "status"] == "removed" and cells.loc[("fogzo", "2"), "new_n"] == 0


def test_a_drop_in_a_lower_is_better_metric_is_better():
    old, new = _records("ste", 2, [30.0, 30.5, 31.0]), _records("ste", 2, [20.0, 20.5, 21.0])
    for r in [*old, *new]:
        r.higher_is_better, r.metric_name = False, "perplexity"
    cell = compare_frame(old, new).iloc[0]
    assert cell["change"] == pytest.approx(-10.0) and cell["significant"] is True and cell["better"] is True


def test_markdown_lists_each_verdict_and_the_added_and_removed_cells():
    text = compare(OLD, NEW)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    p_text = f"{_cells().loc[('ste', '2'), 'p_value']:.3f}"
    assert rows["ste"][:5] == ["2", "80.50 ± 0.50 (3)", "84.50 ± 0.50 (3)", "+4.00", p_text]
    assert rows["ste"][5] == "yes, better" and rows["parq"][5] == "no"
    assert rows["talr"][1:] == ["70.00 (1)", "71.50 ± 0.71 (2)", "+1.50", "n/a", "n/a"]
    assert "Only in the new records (added)" in text and rows["binaryrelax"] == ["2", "83.50 ± 0.71 (2)"]
    assert "Only in the old records (removed)" in text and rows["fogzo"] == ["2", "75.50 ± 0.71 (2)"]
    assert "Welch's unequal-variance t-test" in text and "## toy: 20 epochs, batch 128, sgd on cpu" in text


def test_the_same_configuration_keeps_its_label_when_the_other_side_adds_a_variant():
    old = _records("ste", 2, [80.0, 81.0])
    new = [*_records("ste", 2, [80.5, 81.5]), *_records("ste", 2, [70.0, 71.0], **OWN_LR)]
    cells = compare_frame(old, new).set_index("row")
    assert cells.loc["ste (lr=0.02)", "status"] == "compared" and cells.loc["ste (lr=0.01)", "status"] == "added"


def test_one_empty_side_adds_everything_and_two_are_an_error():
    assert set(compare_frame([], NEW)["status"]) == {"added"}
    with pytest.raises(QatbenchError, match="no run records"):
        compare([], [])
