"""The statistics of the leaderboards: summaries over seeds, Student-t intervals, paired and Welch's t-tests,
and Holm's control of the error rate over a family of tests.

Every function is pure and states its formula. A run is one sample; a cell of a table is the
sample of its seeds, `x_1 .. x_n`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

LEVEL = 0.95  # the confidence level of every interval
ALPHA = 0.05  # the significance level of every test
TEST_NAME = "Welch's unequal-variance t-test, two-sided"


@dataclass(frozen=True)
class Summary:
    """A cell: mean, sample standard deviation (NaN for n = 1), n, and the interval of the mean (NaN for n = 1)."""

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float


def t_critical(n: int, level: float = LEVEL) -> float:
    """`t_{(1 + level) / 2, n - 1}`: the two-sided critical value of Student's t with n - 1 degrees of freedom
    (4.302653 for n = 3 at 95 %). NaN for n < 2."""
    return float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) if n >= 2 else math.nan


def confidence_interval(mean: float, std: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Student-t interval of the mean, `mean -+ t_{(1 + level) / 2, n - 1} * s / sqrt(n)`; (NaN, NaN) for
    n < 2, where no spread is known."""
    if n < 2:
        return math.nan, math.nan
    half = t_critical(n, level) * std / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    """Mean `m = sum x_i / n`, sample standard deviation `s = sqrt(sum (x_i - m)^2 / (n - 1))` (NaN for n = 1)
    and the `level` interval of the mean."""
    n = len(values)
    if n == 0:
        raise ValueError("cannot summarize an empty sample")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, std, n, *confidence_interval(mean, std, n, level))


def welch_p(a: Summary, b: Summary) -> float | None:
    """Two-sided p-value of Welch's t-test that cells `a` and `b` have the same mean.

    `t = (m_a - m_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b)` with Welch-Satterthwaite degrees of freedom
    `nu = (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2 / (n_a - 1) + (s_b^2/n_b)^2 / (n_b - 1))`,
    `p = 2 * (1 - F_nu(|t|))`. None when either cell is a single run (no variance to test with). When both
    cells have zero spread, the t statistic is undefined: p = 1 for equal means, 0 for different ones.
    """
    if a.n < 2 or b.n < 2:
        return None
    if a.std == 0 and b.std == 0:
        return 1.0 if a.mean == b.mean else 0.0
    result = scipy_stats.ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False)
    return float(result.pvalue)


def paired_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test that runs `a_i` and `b_i` of the same seeds have the same mean.

    `d_i = a_i - b_i`, `t = mean(d) / (s_d / sqrt(n))` with `n - 1` degrees of freedom, `p = 2 (1 - F(|t|))`.
    None for fewer than 2 pairs. Where every difference is the same, `s_d = 0`: p = 1 when they are all zero,
    0 otherwise (a constant non-zero difference is as certain as a test can be)."""
    if len(a) != len(b):
        raise ValueError("a paired test needs as many runs on each side")
    if len(a) < 2:
        return None
    differences = [x - y for x, y in zip(a, b)]
    if all(d == differences[0] for d in differences):
        return 1.0 if differences[0] == 0 else 0.0
    return float(scipy_stats.ttest_rel(a, b).pvalue)


def holm(p_values: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Holm's step-down adjustment (Holm 1979), which controls the family-wise error rate of `m` tests at any
    level: with the p-values sorted, `p_(1) <= ... <= p_(m)`, the adjusted `p'_(i) = max_{j <= i} min(1,
    (m - j + 1) p_(j))`; a test is rejected at level alpha when `p' < alpha`. Written here (a few lines) rather
    than taken from statsmodels, which the project does not otherwise need."""
    if any(math.isnan(p) for p in p_values.values()):
        raise ValueError("Holm's adjustment of a NaN p-value: leave untested pairs out of the family")
    ordered = sorted(p_values, key=lambda k: p_values[k])
    m, running, adjusted = len(ordered), 0.0, {}
    for j, key in enumerate(ordered):
        running = max(running, min(1.0, (m - j) * p_values[key]))
        adjusted[key] = running
    return adjusted


_MEAN_STD = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(?:(?:±|\+-|\+/-)\s*(\d+(?:\.\d*)?))?\s*$")


def parse_mean_std(text: str | float) -> tuple[float, float | None]:
    """A published number: "91.22 ± 0.15", "91.22+-0.15", "91.22 +/- 0.15" -> (91.22, 0.15); "91.22" or a plain
    number -> (91.22, None). ValueError for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text), None
    match = _MEAN_STD.match(str(text))
    if match is None:
        raise ValueError(f"not a 'mean ± std' number: {text!r}")
    return float(match.group(1)), None if match.group(2) is None else float(match.group(2))


def inside(value: float, low: float, high: float) -> bool | None:
    """Whether `low <= value <= high`; None when the interval is unknown (NaN bounds, a single run)."""
    if math.isnan(low) or math.isnan(high):
        return None
    return low <= value <= high
