import math

import pytest
from scipy import stats as scipy_stats

from qatbench import stats


def test_critical_t_value_is_students_two_sided_quantile():
    assert stats.t_critical(3) == pytest.approx(4.302653, abs=1e-6)
    assert stats.t_critical(2) == pytest.approx(12.706205, abs=1e-6)
    assert math.isnan(stats.t_critical(1))


def test_summary_is_mean_sample_std_and_the_student_t_interval():
    s = stats.summarize([80.0, 84.0, 82.0])
    assert (s.mean, s.std, s.n) == (82.0, 2.0, 3)
    assert s.ci_low == pytest.approx(82 - 4.9683, abs=1e-4) and s.ci_high == pytest.approx(82 + 4.9683, abs=1e-4)


def test_a_single_run_has_no_spread_and_no_interval():
    s = stats.summarize([70.0])
    assert s.mean == 70.0 and s.n == 1 and math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    with pytest.raises(ValueError, match="empty"):
        stats.summarize([])


def test_welch_p_follows_the_formula_and_agrees_with_scipy_on_the_raw_values():
    a, b = [85.0, 87.0], [80.0, 84.0, 82.0]
    va, vb = 2.0 / 2, 4.0 / 3  # s^2 / n
    t = (86 - 82) / math.sqrt(va + vb)
    nu = (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2)
    expected = 2 * scipy_stats.t.sf(abs(t), nu)
    p = stats.welch_p(stats.summarize(a), stats.summarize(b))
    assert p == pytest.approx(expected, rel=1e-9) and p == pytest.approx(0.082441, abs=1e-6)
    assert p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)


def test_welch_p_is_none_for_a_single_run_and_decided_by_the_means_without_spread():
    one, three = stats.summarize([70.0]), stats.summarize([69.0, 70.0, 71.0])
    assert stats.welch_p(one, three) is None and stats.welch_p(three, one) is None
    assert stats.welch_p(stats.summarize([5.0, 5.0]), stats.summarize([5.0, 5.0, 5.0])) == 1.0
    assert stats.welch_p(stats.summarize([5.0, 5.0]), stats.summarize([6.0, 6.0])) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("91.22 ± 0.15", (91.22, 0.15)), ("91.22+-0.15", (91.22, 0.15)), ("91.22 +- 0.15", (91.22, 0.15)),
    ("91.22 +/- 0.15", (91.22, 0.15)), ("91.22", (91.22, None)), (91.82, (91.82, None)), (75, (75.0, None)),
    ("-1.5 ± 2", (-1.5, 2.0)),
])
def test_published_numbers_parse_as_mean_and_std(text, expected):
    assert stats.parse_mean_std(text) == expected


@pytest.mark.parametrize("text", ["", "n/a", "91.22 ± ", "± 0.1", "91.2 ± 0.1 ± 0.2"])
def test_anything_else_is_not_a_published_number(text):
    with pytest.raises(ValueError, match="mean ± std"):
        stats.parse_mean_std(text)


def test_inside_the_interval_or_unknown_without_one():
    assert stats.inside(91.71, 91.6, 91.8) is True
    assert stats.inside(91.22, 89.85, 90.35) is False
    assert stats.inside(91.0, math.nan, math.nan) is None


def test_paired_p_follows_the_formula_on_the_differences():
    a, b = [84.1, 85.5, 83.0, 84.8], [83.0, 84.6, 82.2, 83.7]  # d = 1.1, 0.9, 0.8, 1.1: seeds move both
    d = [x - y for x, y in zip(a, b)]
    mean, sd = sum(d) / 4, math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    t = mean / (sd / 2)
    assert stats.paired_p(a, b) == pytest.approx(2 * (1 - scipy_stats.t.cdf(t, 3)), rel=1e-9)
    # the pairing matters: the same values unpaired (Welch) are far less certain than paired
    assert stats.paired_p(a, b) < stats.welch_p(stats.summarize(a), stats.summarize(b)) / 10


def test_paired_p_of_constant_differences_and_of_too_few_pairs():
    assert stats.paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0 and stats.paired_p([2.0, 3.0], [1.0, 2.0]) == 0.0
    assert stats.paired_p([1.0], [2.0]) is None
    with pytest.raises(ValueError):
        stats.paired_p([1.0, 2.0], [1.0])


def test_holm_adjusts_by_hand_and_keeps_the_order():
    # sorted 0.01, 0.02, 0.04, 0.3: x4, x3, x2, x1 -> 0.04, 0.06, 0.08, 0.3 (monotone)
    assert stats.holm({"a": 0.04, "b": 0.01, "c": 0.3, "d": 0.02}) == pytest.approx(
        {"a": 0.08, "b": 0.04, "c": 0.3, "d": 0.06})
    assert stats.holm({"a": 0.5, "b": 0.4}) == {"a": 0.8, "b": 0.8}  # min(1, 2 x 0.4) = 0.8, then max(0.8, 0.5)
    assert stats.holm({}) == {}
