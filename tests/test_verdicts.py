"""A column's decision (pairs over seeds, Holm, the best's group, one sentence) and the cells to check."""

from qatbench import stats
from qatbench.verdicts import Cell, decide, flags


def _cell(row, values, start=0):
    return Cell(row, {start + i: v for i, v in enumerate(values)})


def test_the_sentence_names_the_top_group_whom_it_beats_and_what_stays_open():
    cells = [_cell("ste", [84.1, 84.3, 84.0, 84.2, 84.4]), _cell("parq", [84.0, 84.4, 84.1, 84.1, 84.3]),
             _cell("fogzo", [80.0, 80.5, 79.8, 80.2, 80.1]), _cell("talr", [81.0, 81.2, 80.9, 81.1, 81.3])]
    decision = decide("2 bits", cells, higher_is_better=True)
    assert decision.best == "ste" and decision.top == ("ste", "parq")
    assert decision.sentence == ("2 bits: ste has the best mean; parq is not told apart from it; both beat talr "
                                 "and fogzo (5 of 6 pairs decided at 0.05, Holm).")
    versus = decision.against_best("fogzo")
    assert versus.test == "paired" and versus.winner == "ste" and versus.p_holm >= versus.p


def test_lower_is_better_and_different_seeds_use_welch():
    cells = [_cell("a", [5.0, 5.1, 4.9]), _cell("b", [6.0, 6.2, 5.8], start=10)]
    decision = decide("4 bits", cells, higher_is_better=False)
    assert decision.best == "a" and decision.against_best("b").test == "Welch"
    assert "every other method is significantly behind it" in decision.sentence


def test_a_single_run_cannot_be_tested_and_is_not_in_the_best_group():
    decision = decide("1 bits", [_cell("a", [70.0, 71.0]), _cell("b", [69.0])], higher_is_better=True)
    assert decision.top == ("a",) and "b cannot be tested against it (a single run on one side)" in decision.sentence


def test_a_single_best_run_and_equal_best_means():
    close = [70.9, 70.95, 71.0]
    decision = decide("1 bits", [_cell("one", [71.0]), _cell("three", close)], higher_is_better=True)
    assert decision.top == ("one",) and decision.against_best("one") is None  # the best is not tested against itself
    decision = decide("1 bits", [_cell("one", [70.9]), _cell("three", close)], higher_is_better=True)
    assert decision.best == "three" and decision.top == ("three",)
    decision = decide("1 bits", [_cell("a", [1.0]), _cell("b", [1.0])], higher_is_better=True)
    assert set(decision.top) == {"a", "b"}


def test_a_row_behind_the_best_names_exactly_the_top_rows_it_is_not_told_apart_from():
    a = [90.0, 90.1, 89.9, 90.05, 89.95]
    b = [x + d for x, d in zip(a, [2.0, -2.5, 1.5, -2.0, 0.8])]  # as good as a on average, but noisy
    c = [x - d for x, d in zip(a, [1.0, 1.05, 0.95, 1.0, 1.02])]  # one point behind a on every seed
    cells = [_cell("a", a), _cell("b", b), _cell("c", c)]
    decision = decide("2 bits", cells, higher_is_better=True)
    assert decision.top == ("a", "b") and "c is behind a but not told apart from b" in decision.sentence


def _summary(values):
    return stats.summarize(values)


def test_flags_more_bits_below_fewer_bits_far_from_fp_and_a_wide_spread():
    fp = _summary([85.5, 85.6, 85.4])
    rows = {
        "good": {"2": _summary([84.0, 84.2, 84.1]), "4": _summary([85.3, 85.4, 85.2])},
        "odd": {"2": _summary([84.0, 84.2, 84.1]), "4": _summary([80.0, 80.2, 79.9])},  # worse at 4 bits
        "fine": {"2": _summary([83.0, 83.5, 83.2]), "4": _summary([85.2, 85.3, 85.1])},
        "noisy": {"2": _summary([60.0, 75.0, 68.0]), "4": _summary([85.0, 85.2, 85.1])},
    }
    found = {}
    for flag in flags(rows, ["2", "4"], fp, higher_is_better=True):
        found.setdefault((flag.row, flag.column), []).append(flag.reason)
    assert set(found) == {("odd", "4"), ("noisy", "2")}
    below, far = sorted(found[("odd", "4")], reverse=True)
    assert below.startswith("its 4-bit mean 80.03 is worse than its own 2-bit interval [83.85, 84.35]")
    assert far == "at 4 bits it is 5.47 from FP while the other methods' median gap is 0.30"
    spread = rows["noisy"]["2"].std
    typical = (rows["good"]["2"].std + rows["fine"]["2"].std) / 2  # the median of 0.10, 0.10, 0.25, 7.51
    assert found[("noisy", "2")] == [f"its spread over seeds (s = {spread:.2f}) is {spread / typical:.1f}x the "
                                     f"column's median ({typical:.2f})"]
