"""The shared quantizer: one definition of levels, rounding and ties, so that every comparison is fair.

`Quantizer` is the only implementation. It acts on a `FlatLayout` (`qatbench.flat`) of rows (one
row per output channel, or one row per tensor); every other path goes through it: the flat step
of every method, the per-tensor hook `prox(latent, levels, t)` (whose `estimate_levels`,
`hard_quantize` and `level_indices` below run the same code on a layout of that one tensor),
fp's diagnostics, rtn, the export and the bench. Conformance tests hold the paths bitwise equal
(`tests/test_quant.py`).

Level sets (after the PARQ reference `UnifQuantizer` / `LSBQuantizer`, MIT), per row:

* uniform, b bits: `q_max = min(b * mean|w|, max|w|)`, `s = q_max / (2^(b-1) - 1/2)`, levels
  `fl(c_k * s)`, `c_k = k - (2^b - 1)/2`, k = 0..2^b-1 (for b = 1: `{-q_max, +q_max}`);
* uniform ternary: `s = max|w| / 1.5`, levels `{-s, 0, s}`;
* LSBQ, b bits (greedy least-squares binary quantization, Pouransari et al. 2020):
  `r = w`; for j = 1..b: `v_j = mean|r|`, `r -= v_j sign(r)` (sign(0) = +1); levels
  `sort{+-v_1 +- ... +- v_b}`;
* LSBQ ternary: `v = 1.1 mean|w|`, levels `{-v, 0, v}`.
* learned steps (LSQ, Esser et al. 2020; `scale="learned"`): the integer grid `fl(k * s)`,
  `k = -2^(b-1) .. 2^(b-1) - 1` (b >= 2), with each row's step `s` trained, not estimated
  (`Quantizer.levels_of_steps`); the step starts at LSQ's `2 mean|w| / sqrt(Q_P)` or at TALR's
  `3 std(w)` divided by `2^(b-1)` (`initial_steps`).

Means are segmented sums accumulated in float64 divided by the row's length, then rounded once
to the weights' dtype: at least as accurate as `torch.mean`, whatever the layout. Float64
weights take `torch.mean` per tensor, and LSBQ's level sums are added in the reference's order
(per tensor in sequence, per channel one matrix product), so that float64 trajectories are the
reference's to rounding (`tests/methods/test_reference.py`). The step never falls below twice the dtype's smallest normal number, so a row of
zeros still has distinct levels.

Rounding, one rule for every path: the nearest level; a weight exactly halfway between two
levels goes to the lower one (as `torch.bucketize`). Uniform levels are rounded in closed
form on `u = fl(w / s)`: the nearest coefficient is `ceil(u) - 1/2` for an even number of
levels, `ceil(u - 1/2)` for an odd one, clamped to the table; the result `fl(c * s)` is bitwise
an entry of the table. Other level sets are searched: the level index is the number of the
row's midpoints `fl((q_k + q_{k+1}) / 2)` strictly below `w`. Which of the two a row takes is
its scheme's (`QuantizerConfig.evenly_spaced`), never a guess from the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import QatbenchError
from .flat import FlatLayout, as_rows

TERNARY = 0
"""`bits == TERNARY` selects the three-level set {-s, 0, s} ("T" on the command line)."""

MAX_BITS = 8

__all__ = ["MAX_BITS", "TERNARY", "FlatLevels", "Quantizer", "QuantizerConfig", "as_rows", "bits_label", "bits_order",
           "check_exact", "distinct_per_row", "estimate_levels", "grid", "grid_coefficients", "hard_quantize",
           "level_indices", "levels_of_table", "num_levels", "parse_bits", "rows_quantizer"]


def parse_bits(text: str) -> int:
    """'1'..'8' -> int, 'T' / 'ternary' -> TERNARY; anything else is a one-line error."""
    if text.strip().lower() in ("t", "ternary"):
        return TERNARY
    try:
        bits = int(text)
    except ValueError:
        bits = None
    if bits is None or not 1 <= bits <= MAX_BITS:
        raise QatbenchError(f"invalid bits {text!r}; valid choices: 1..{MAX_BITS} or T (ternary)")
    return bits


def bits_label(bits: int | None) -> str:
    """How a bit width is printed: '2', 'T' for ternary, 'FP' for none."""
    if bits is None:
        return "FP"
    return "T" if bits == TERNARY else str(bits)


def bits_words(label: str) -> str:
    """A bit-width label in words: "1 bit", "2 bits", "2/2 bits" (weights / activations)."""
    return f"{label} bit{'' if label == '1' else 's'}"


def bits_order(bits: int | None) -> float:
    """Sort key that puts ternary (log2 3 = 1.58 bits) between 1 and 2 bits, FP last."""
    if bits is None:
        return float("inf")
    return 1.585 if bits == TERNARY else float(bits)


def num_levels(bits: int) -> int:
    """m: the number of quantization levels of one row."""
    return 3 if bits == TERNARY else 2**bits


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """Which level set, at what bit width, per row or per tensor."""

    bits: int
    scheme: Literal["uniform", "lsbq"] = "uniform"
    granularity: Literal["channel", "tensor"] = "channel"
    scale: Literal["estimated", "learned"] = "estimated"
    step_init: Literal["lsq", "3std"] = "lsq"  # where learned steps start (`Quantizer.initial_steps`)

    def __post_init__(self) -> None:
        if self.bits != TERNARY and not 1 <= self.bits <= MAX_BITS:
            raise QatbenchError(f"invalid bits {self.bits}; valid choices: 1..{MAX_BITS} or T (ternary)")
        if self.scale == "learned" and self.scheme != "uniform":
            raise QatbenchError(f"learned steps (LSQ) quantize to a uniform integer grid, not to {self.scheme} levels; "
                                "valid choice: --quantizer uniform")
        if self.scale == "learned" and self.bits in (1, TERNARY):
            raise QatbenchError(f"learned steps (LSQ) need at least 2 bits, not {bits_label(self.bits)}: LSQ's grid "
                                "-2^(b-1)..2^(b-1)-1 has no positive level at 1 bit")

    @property
    def evenly_spaced(self) -> bool:
        """Uniform levels (ternary included) are a grid with a positive step: they are rounded in closed form."""
        return self.scheme == "uniform"

    @property
    def integer_grid(self) -> bool:
        """Learned steps quantize to the integer grid `k s`, k = -2^(b-1)..2^(b-1)-1 (zero a level)."""
        return self.scale == "learned"

    def identity(self) -> dict[str, Any]:
        """What a run's identity says of its quantizer: `scale` only when learned (so that identities made before
        learned steps existed stay as they were)."""
        fields = dataclasses.asdict(self)
        if self.scale == "estimated":
            del fields["scale"], fields["step_init"]
        return fields


def first_coefficient(m: int, integer: bool = False) -> float:
    """`c_0` of a grid of m levels: `-(m - 1)/2` (symmetric), or `-m/2` (the integer grid of learned steps)."""
    return -(m // 2) if integer else -(m - 1) / 2


def grid_coefficients(m: int, dtype: torch.dtype, device: torch.device | str = "cpu", integer: bool = False) -> Tensor:
    """`c_k = c_0 + k`, k = 0..m-1: the exact multiples of the step that uniform levels are: symmetric
    (`c_0 = -(m - 1)/2`: half-integers for even m), or the integer grid of learned steps (`c_0 = -m/2`)."""
    return torch.arange(m, dtype=dtype, device=device) + first_coefficient(m, integer)


def grid(levels: Tensor, integer: bool = False) -> tuple[float, Tensor]:
    """`(c_0, s)` of uniform levels `fl(c_k * s)`: the first coefficient and each row's step `(rows, 1)`,
    recovered exactly (halving and doubling are exact): `s = 2 * level` at `c = 1/2` for a symmetric grid of
    even m, the level at `c = 1` otherwise (ternary, the integer grid)."""
    m = levels.shape[1]
    first = first_coefficient(m, integer)
    if not integer and m % 2 == 0:
        return first, levels[:, m // 2: m // 2 + 1] * 2
    one = int(1 - first)  # the index of c = 1
    return first, levels[:, one: one + 1]


# ---------------------------------------------------------------- levels of a layout


@dataclasses.dataclass
class FlatLevels:
    """The level tables of every row of a layout, and what rounding to them needs: for uniform levels each row's
    step `(R,)` and that step repeated over the row's elements `(N,)` (closed-form rounding is five elementwise
    operations); for other level sets each row's midpoints, then +inf, padded to a power of two `(R * S,)`, which
    a branchless binary search walks with log2(m) gathers. Per quantized weight, 4 bytes."""

    table: Tensor  # (R, m) sorted levels
    steps: Tensor | None  # (R,) uniform levels' steps; None for other level sets
    element_steps: Tensor | None  # (N,) each element's row's step (uniform levels)
    bounds: Tensor | None  # (R * S,) each row's midpoints, then +inf (other level sets); S = search_stride(m)
    padded: Tensor | None  # (R * S,) each row's levels, then +inf

    @property
    def m(self) -> int:
        return self.table.shape[1]


def search_stride(m: int) -> int:
    """The row stride of the searched tables: a power of two > m, room for every binary search over them."""
    return 1 << m.bit_length()


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _padded(table: Tensor, width: int) -> Tensor:
    pad = torch.full((table.shape[0], width - table.shape[1]), math.inf, dtype=table.dtype, device=table.device)
    return torch.cat([table, pad], dim=1).contiguous()


def make_levels(table: Tensor, steps: Tensor | None, layout: FlatLayout) -> FlatLevels:
    """The levels of a layout from their tables (and, for uniform levels, their steps): what rounding needs."""
    if steps is not None:
        return FlatLevels(table.contiguous(), steps, layout.per_element(steps), None, None)
    stride = search_stride(table.shape[1])
    bounds = (table[:, 1:] + table[:, :-1]) / 2
    return FlatLevels(table.contiguous(), None, None, _padded(bounds, stride).view(-1), _padded(table, stride).view(-1))


def levels_of_table(table: Tensor, evenly_spaced: bool, layout: FlatLayout, integer: bool = False) -> FlatLevels:
    """The levels of a layout from their tables alone (a uniform table's steps are recovered exactly, `grid`)."""
    return make_levels(table, grid(table, integer)[1].reshape(-1) if evenly_spaced else None, layout)


class Quantizer:
    """The shared quantizer over a flat layout: levels, hard quantization, level indices, level intervals.

    Its constants (the grid coefficients, LSBQ's sign patterns) are made once, on the layout's device."""

    def __init__(self, config: QuantizerConfig, layout: FlatLayout) -> None:
        self.config, self.layout = config, layout
        self.m = num_levels(config.bits)
        self.first = first_coefficient(self.m, config.integer_grid)
        self.half_integers = self.first != int(self.first)  # a symmetric grid of even m: levels at half-integers
        device, dtype = layout.device, layout.dtype
        self.coefficients = grid_coefficients(self.m, dtype, device, config.integer_grid)
        self.signs = (torch.tensor(list(itertools.product((-1.0, 1.0), repeat=config.bits)), dtype=dtype,
                                   device=device).T if config.bits != TERNARY else None)
        self.ternary_lsbq = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device=device)
        ones = torch.ones(layout.numel, dtype=torch.float64, device=device)
        self.row_counts = layout.row_reduce(ones, "sum")  # float64
        # where each element's row starts in the searched tables (int32), for level sets that are searched
        self.row_start = layout.row_index().mul_(search_stride(self.m)) if config.scheme != "uniform" else None

    def _row_mean_abs(self, flat: Tensor) -> Tensor:
        """`mean|w|` of every row, accumulated in float64 and rounded once to the dtype: one segmented float64 sum
        over the buffer divided by the row lengths (a fixed number of operations however many tensors). Float64
        weights have no wider accumulator: their rows take `torch.mean` tensor by tensor, bitwise the reference's
        statistics (float64 is the dtype in which trajectories are checked against it, not one to train fast in)."""
        if flat.dtype == torch.float64 and not self.layout.rows_span_ranks:
            return torch.cat([rows.abs().mean(dim=1) for rows in self.layout.row_views(flat)])
        return (self.layout.row_reduce(flat.abs().double(), "sum") / self.row_counts).to(flat.dtype)

    def levels(self, latent: Tensor) -> FlatLevels:
        """The levels of every row of the flat `latent` buffer (estimated from it; learned steps have their own,
        `levels_of_steps`)."""
        if self.config.scheme == "lsbq":
            return make_levels(self._lsbq_table(latent), None, self.layout)
        amax = self.layout.row_reduce(latent.abs(), "max")
        if self.config.bits == TERNARY:
            q_max, half_range = amax, 1.5
        else:
            q_max = torch.minimum(self.config.bits * self._row_mean_abs(latent), amax)
            half_range = 2 ** (self.config.bits - 1) - 0.5
        steps = (q_max / half_range).clamp_(min=2 * torch.finfo(latent.dtype).tiny)
        return make_levels(self.coefficients * steps[:, None], steps, self.layout)

    def levels_of_steps(self, steps: Tensor) -> FlatLevels:
        """The integer grid `fl(k s)` of every row's (learned) step `s` `(R,)`."""
        return make_levels(self.coefficients * steps[:, None], steps, self.layout)

    def initial_steps(self, latent: Tensor) -> Tensor:
        """Learned steps to start from, `(R,)`: LSQ's `2 mean|w| / sqrt(Q_P)`, or TALR's `s_W = 3 std(w)` as the
        step of its grid `gamma w / s_W` (`gamma = 2^(b-1)`): `3 std(w) / 2^(b-1)`. Statistics in float64."""
        q_p, gamma = -self.first - 1, -self.first  # Q_P = 2^(b-1) - 1, gamma = 2^(b-1)
        if self.config.step_init == "lsq":
            steps = 2 * self._row_mean_abs(latent) / math.sqrt(q_p)
        else:
            flat = latent.double()
            mean = self.layout.row_reduce(flat, "sum") / self.row_counts
            square = self.layout.row_reduce((flat - self.layout.per_element(mean)).square_(), "sum")
            steps = (3 * (square / (self.row_counts - 1).clamp_(min=1)).sqrt_() / gamma).to(latent.dtype)
        return steps.clamp_(min=2 * torch.finfo(latent.dtype).tiny)

    def _lsbq_table(self, latent: Tensor) -> Tensor:
        """Greedy LSBQ: b times `v_j = mean|r|` per row, `r -= v_j sign(r)`; levels `sort(+-v_1 ... +-v_b)`."""
        if self.config.bits == TERNARY:
            return (1.1 * self._row_mean_abs(latent))[:, None] * self.ternary_lsbq
        residual = latent.clone()
        basis = []
        for _ in range(self.config.bits):
            v = self._row_mean_abs(residual)
            residual.sub_(torch.where(residual >= 0, 1.0, -1.0).mul_(self.layout.per_element(v)))
            basis.append(v)
        basis = torch.stack(basis, dim=1)  # (R, b)
        if self.layout.granularity == "tensor":  # a sum per level in order, as the reference's matrix-vector product
            table = sum(basis[:, j, None] * self.signs[j] for j in range(self.config.bits))
        else:  # the reference's matrix product, (R, b) @ (b, 2^b)
            table = basis @ self.signs
        return table.sort(dim=1).values

    # -- elementwise, whole-buffer operations ------------------------------------------------------
    def _search(self, values: Tensor, table: Tensor, outcomes: int) -> Tensor:
        """For each element, the position in the flat table `(R * S,)` of its row's first entry that is not below
        it, i.e. the row's start plus how many of its sorted entries are below the value (ties go down), among
        the first `outcomes - 1` entries: a branchless binary search of log2 steps of four operations."""
        position = self.row_start.clone()
        half = _power_of_two_at_least(outcomes) // 2
        while half >= 1:
            probe = table.index_select(0, position + (half - 1))
            position.add_(values > probe, alpha=half)
            half //= 2
        return position

    def _nearest_coefficient(self, scaled: Tensor) -> Tensor:
        """In place: the coefficient `c_k` of the nearest uniform level to `u = w / s`, a tie going down: the
        half-integer `ceil(u) - 1/2` (a symmetric grid of even m) or the integer `ceil(u - 1/2)` (odd m, the
        integer grid), clamped to `[c_0, c_{m-1}]`."""
        nearest = scaled.ceil_().sub_(0.5) if self.half_integers else scaled.sub_(0.5).ceil_()
        return nearest.clamp_(self.first, self.first + self.m - 1)

    def indices(self, values: Tensor, levels: FlatLevels) -> Tensor:
        """The index of the nearest level of every element (int32 for searched tables, float for uniform)."""
        if levels.steps is not None:
            return self._nearest_coefficient(values / levels.element_steps).sub_(self.first)
        return self._search(values, levels.bounds, self.m) - self.row_start

    def hard_quantize(self, values: Tensor, levels: FlatLevels, out: Tensor | None = None) -> Tensor:
        """`Q[nearest(w)]` of every element, bitwise an entry of its row's table (`fl(c_k s)`, one rounding,
        as the table), into `out` when given."""
        if levels.steps is not None:  # computed in place in `out`: five elementwise operations, no allocation
            steps = levels.element_steps
            return self._nearest_coefficient(torch.div(values, steps, out=out)).mul_(steps)
        return torch.index_select(levels.padded, 0, self._search(values, levels.bounds, self.m), out=out)

    def interval(self, values: Tensor, levels: FlatLevels) -> tuple[Tensor, Tensor]:
        """`(q_lo, q_hi)`: the levels around each element (both the end level outside `[q_1, q_m]`); an element
        exactly on a level lies in the interval above it (the prox maps are continuous there)."""
        if levels.steps is not None:
            steps = levels.element_steps
            j = (values / steps).sub_(self.first).floor_().clamp_(0, self.m - 2).add_(self.first)
            return j * steps, j.add_(1).mul_(steps)
        above = self._search(values, levels.padded, self.m + 1)  # w lies in (q[above - 1], q[above]]
        flat_table = levels.padded
        low = flat_table.index_select(0, torch.maximum(above - 1, self.row_start))
        high = flat_table.index_select(0, torch.minimum(above, self.row_start + (self.m - 1)))
        return low, high


# ---------------------------------------------------------------- one tensor at a time


def _config_of(levels: Tensor, evenly_spaced: bool, integer: bool = False) -> QuantizerConfig:
    """The configuration that rounds to a table of m levels (its bit width only decides m)."""
    m = levels.shape[1]
    bits = TERNARY if m == 3 else m.bit_length() - 1
    return QuantizerConfig(bits, "uniform" if evenly_spaced else "lsbq", "channel",
                           "learned" if integer else "estimated")


def _on_rows(rows: Tensor, config: QuantizerConfig) -> tuple[Quantizer, Tensor]:
    """The shared quantizer over a layout of the one tensor `rows` `(R, C)` (R rows), and its values, flat."""
    rows = rows.contiguous()
    return Quantizer(config, FlatLayout([rows], "channel")), rows.view(-1)


def estimate_levels(rows: Tensor, config: QuantizerConfig) -> Tensor:
    """The level table `(R, m)` of `rows` `(R, C)` under `config`."""
    with torch.no_grad():
        quantizer, flat = _on_rows(rows, config)
        return quantizer.levels(flat).table


def rows_quantizer(rows: Tensor, levels: Tensor, evenly_spaced: bool,
                   integer: bool = False) -> tuple[Quantizer, Tensor, FlatLevels]:
    """The shared quantizer over the one tensor `rows` `(R, C)` with the level table `(R, m)` of each row: the
    quantizer, the values flat, the levels (closed-form rounding for uniform levels, `evenly_spaced`, on the
    integer grid of learned steps with `integer`; searched otherwise). What a per-tensor hook runs, so that it
    rounds as the flat step does."""
    quantizer, flat = _on_rows(rows, _config_of(levels, evenly_spaced, integer))
    return quantizer, flat, levels_of_table(levels, evenly_spaced, quantizer.layout, integer)


def hard_quantize(rows: Tensor, levels: Tensor, out: Tensor | None = None, evenly_spaced: bool = False,
                  integer: bool = False) -> Tensor:
    """Nearest level of every weight of `rows` `(R, C)` in its row's table `(R, m)` (a tie goes down), written into
    `out` when given: the closed form for uniform levels (`evenly_spaced`, as a uniform quantizer's hook must
    say; `integer` for the grid of learned steps), the search otherwise."""
    quantizer, flat, flat_levels = rows_quantizer(rows, levels, evenly_spaced, integer)
    result = quantizer.hard_quantize(flat, flat_levels).view_as(rows)
    return result if out is None else out.copy_(result)


def level_indices(rows: Tensor, levels: Tensor, evenly_spaced: bool = False, integer: bool = False) -> Tensor:
    """Integer index of the nearest level of every weight of `rows` `(R, C)`, int64 (a tie goes down)."""
    quantizer, flat, flat_levels = rows_quantizer(rows, levels, evenly_spaced, integer)
    return quantizer.indices(flat, flat_levels).long().view_as(rows)


# ---------------------------------------------------------------- exactness


def distinct_per_row(rows: Tensor) -> Tensor:
    """Number of distinct values in each row, `(rows,)`."""
    ordered = rows.sort(dim=1).values
    return (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1


@dataclasses.dataclass(frozen=True)
class TensorExactness:
    """Result of the exactness check for one quantized tensor."""

    name: str
    distinct: int  # most distinct values in any row (the whole tensor if per-tensor)
    allowed: int  # m

    @property
    def ok(self) -> bool:
        return self.distinct <= self.allowed


def check_exact(name: str, weight: Tensor, granularity: str, bits: int) -> TensorExactness:
    """A tensor is quantized iff every row holds at most m distinct values."""
    rows = as_rows(weight.detach(), granularity)
    return TensorExactness(name, int(distinct_per_row(rows).max()), num_levels(bits))
