"""What a leaderboard column decides, and which of its cells to check.

A column holds the cells of one bit width in one section (the same budget), one cell per method row, each
the sample of its seeds. Every pair of cells is compared: by the paired t-test where both ran the same
seeds (a seed gives every method the same initial weights and data order, so the seeds pair), by Welch's
test otherwise; the column's p-values are adjusted together by Holm's method, so that the chance of any
false "A beats B" in a column is at most alpha. From the adjusted tests: the best cell, the cells not told
apart from it (bold), and one sentence of what the column decides and what it leaves open.

Cells to check are flagged by rules that compare a cell with its neighbours: a mean at more bits below the
interval of the same row at fewer bits; at the most bits, a cell far from FP while the others are close;
a spread over seeds several times its column's median.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Hashable, Mapping, Sequence

from . import stats


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell: its row label and its runs' metrics by seed."""

    row: str
    values: Mapping[Hashable, float]

    @property
    def summary(self) -> stats.Summary:
        return stats.summarize(list(self.values.values()))


@dataclasses.dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    test: str  # "paired" | "Welch" | "none" (a single run on one side)
    p: float | None
    p_holm: float | None
    winner: str | None  # the better row where the adjusted test rejects equality, else None

    def involves(self, row: str) -> bool:
        return row in (self.a, self.b)


@dataclasses.dataclass(frozen=True)
class ColumnDecision:
    column: str
    best: str
    top: tuple[str, ...]  # the best and every row not told apart from it (best first)
    comparisons: tuple[Comparison, ...]
    sentence: str

    def against_best(self, row: str) -> Comparison | None:
        """The comparison of `row` with the best row (None for the best itself)."""
        if row == self.best:
            return None
        return next((c for c in self.comparisons if c.involves(row) and c.involves(self.best)), None)


def compare(a: Cell, b: Cell) -> tuple[str, float | None]:
    """(test, p): paired over the seeds where both cells ran the same seeds (at least 2), Welch's otherwise."""
    if set(a.values) == set(b.values) and len(a.values) >= 2:
        seeds = sorted(a.values, key=str)
        return "paired", stats.paired_p([a.values[s] for s in seeds], [b.values[s] for s in seeds])
    p = stats.welch_p(a.summary, b.summary)
    return ("Welch", p) if p is not None else ("none", None)


def decide(column: str, cells: Sequence[Cell], higher_is_better: bool, alpha: float = stats.ALPHA) -> ColumnDecision:
    """Every pair of `cells` compared, Holm-adjusted over the column; the best, its group and the sentence."""
    means = {c.row: c.summary.mean for c in cells}
    order = sorted(means, key=lambda r: -means[r] if higher_is_better else means[r])
    tested = {}
    for a, b in itertools.combinations(cells, 2):
        tested[(a.row, b.row)] = compare(a, b)
    adjusted = stats.holm({k: p for k, (_, p) in tested.items() if p is not None and not math.isnan(p)})
    comparisons = []
    for (a, b), (test, p) in tested.items():
        p_holm = adjusted.get((a, b))
        better = a if (means[a] > means[b]) == higher_is_better else b
        winner = better if p_holm is not None and p_holm < alpha and means[a] != means[b] else None
        comparisons.append(Comparison(a, b, test, p, p_holm, winner))
    best = order[0]
    untested = {r for r in order if r != best and _versus(comparisons, best, r).p_holm is None
                and means[r] != means[best]}
    top = tuple(r for r in order if r == best or (r not in untested and not _beats(comparisons, best, r)))
    sentence = _sentence(column, [r for r in order if r not in untested], top, comparisons, alpha)
    if untested:
        sentence = sentence[:-1] + (f"; {_names(sorted(untested))} cannot be tested against it (a single run on "
                                    f"one side).")
    return ColumnDecision(column, best, top, tuple(comparisons), sentence)


def _versus(comparisons: Sequence[Comparison], a: str, b: str) -> Comparison:
    return next(c for c in comparisons if c.involves(a) and c.involves(b))


def _beats(comparisons: Sequence[Comparison], winner: str, loser: str) -> bool:
    return any(c.involves(winner) and c.involves(loser) and c.winner == winner for c in comparisons)


def _names(rows: Sequence[str]) -> str:
    rows = list(rows)
    return rows[0] if len(rows) == 1 else ", ".join(rows[:-1]) + " and " + rows[-1]


def _sentence(column: str, order: list[str], top: tuple[str, ...], comparisons: Sequence[Comparison],
              alpha: float) -> str:
    """One sentence: the best, who is not told apart from it, whom the whole top group beats, what is left open."""
    best, rest = order[0], [r for r in order if r not in top]
    parts = [f"{column}: {best} has the best mean"]
    if len(order) == 1:
        return parts[0] + "."
    others = [r for r in top if r != best]
    parts.append(f"{_names(others)} {'is' if len(others) == 1 else 'are'} not told apart from it" if others
                 else "every other method is significantly behind it")
    beaten = [r for r in rest if all(_beats(comparisons, t, r) for t in top)]
    open_rows = [r for r in rest if r not in beaten]
    if others and beaten:
        parts.append(f"{'both' if len(top) == 2 else 'all ' + str(len(top))} beat {_names(beaten)}")
    for row in open_rows:
        level = [t for t in top if not _beats(comparisons, t, row)]
        parts.append(f"{row} is behind {best} but not told apart from {_names(level)}")
    decided = sum(c.winner is not None for c in comparisons)
    tested = sum(c.p_holm is not None for c in comparisons)
    return "; ".join(parts) + f" ({decided} of {tested} pairs decided at {alpha:g}, Holm)."


@dataclasses.dataclass(frozen=True)
class Flag:
    row: str
    column: str
    reason: str


BELOW_FP_SHARE = 0.035  # a cell this far below FP (a share of FP's value) at the most bits ...
OTHERS_CLOSE_SHARE = 0.006  # ... while the others' median gap is within this share: check it
SPREAD_FACTOR = 3.0  # a spread over seeds this many times the column's median spread: check it


def flags(rows: Mapping[str, Mapping[str, stats.Summary]], bit_columns: Sequence[str], fp: stats.Summary | None,
          higher_is_better: bool) -> list[Flag]:
    """Cells to check in one section: `rows[row][column]`, the weight-only `bit_columns` in increasing bits."""
    found = []
    worse = (lambda x, y: x < y) if higher_is_better else (lambda x, y: x > y)
    for row, cells in rows.items():  # more bits, worse than the interval at fewer bits
        present = [c for c in bit_columns if c in cells]
        for low, high in zip(present, present[1:]):
            fewer, more = cells[low], cells[high]
            bound = fewer.ci_low if higher_is_better else fewer.ci_high
            if not math.isnan(bound) and worse(more.mean, bound):
                found.append(Flag(row, high, f"its {high}-bit mean {more.mean:.2f} is worse than its own "
                                             f"{low}-bit interval [{fewer.ci_low:.2f}, {fewer.ci_high:.2f}]"))
    if fp is not None and bit_columns:  # at the most bits, far from FP while the others are close
        top = bit_columns[-1]
        gaps = {row: (fp.mean - cells[top].mean) * (1 if higher_is_better else -1)
                for row, cells in rows.items() if top in cells}
        for row, gap in gaps.items():
            others = [g for r, g in gaps.items() if r != row]
            if others and gap > BELOW_FP_SHARE * abs(fp.mean) and \
                    statistics.median(others) <= OTHERS_CLOSE_SHARE * abs(fp.mean):
                found.append(Flag(row, top, f"at {top} bits it is {gap:.2f} from FP while the other methods' median "
                                            f"gap is {statistics.median(others):.2f}"))
    for column in {c for cells in rows.values() for c in cells}:  # a spread far above the column's
        spreads = {row: cells[column].std for row, cells in rows.items()
                   if column in cells and not math.isnan(cells[column].std)}
        if len(spreads) >= 3:
            typical = statistics.median(spreads.values())
            for row, spread in spreads.items():
                if typical > 0 and spread > SPREAD_FACTOR * typical:
                    found.append(Flag(row, column, f"its spread over seeds (s = {spread:.2f}) is "
                                                   f"{spread / typical:.1f}x the column's median ({typical:.2f})"))
    return sorted(found, key=lambda f: (f.row, f.column))
