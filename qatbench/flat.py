"""Quantized weights in memory: every quantized tensor of a method in one flat buffer.

Layout: each quantized tensor's rows (its `as_rows` view: one row per output channel, or
one row per tensor) lie one after the other in a flat buffer, in the tensor's memory
order; row r holds `row_lengths[r]` elements. The model's parameters become strided views
into the flat buffer of model weights, so writing the weights of every quantized tensor
is one operation, and a step is a fixed number of whole-buffer operations however many
tensors there are. Where parameters cannot be re-pointed (FSDP's sharded parameters), the
buffer is copied to and from them with one foreach copy.

Under FSDP (`split`), a layout holds this rank's shards: rows of dim 0, so a per-channel
row lies whole on one rank and its statistics are local; the statistics of rows that span
the ranks (per-tensor levels) and of whole tensors are all-reduced, so that every rank
computes the levels an unsharded run computes.

Levels (`FlatLevels`): the level table of every row `(R, m)`; for uniform levels the step
of every row `(R,)` (a uniform level is `fl(c_k * s)`, `qatbench.quant`) and that step
repeated over the row's elements `(N,)`, so that hard quantization is five elementwise
operations; for other level sets the decision boundaries of every row padded with +inf to
a power of two, which a branchless binary search walks with log2(m) gathers through a row
index `(N,)` int32. Per-row statistics come from segment reductions over the flat buffer;
the level refresh is a fixed number of operations too, with no tensor built from host
values (its constants are made once, on the device). Per quantized weight, the levels
cost 4 bytes (the repeated step, or the row index).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import Tensor

from .distributed import reduce_tensor_
from .quant import TERNARY, QuantizerConfig, as_rows, grid_coefficients, num_levels


class FlatLayout:
    """Where every quantized tensor's rows lie in a flat buffer, and the index tensors that go with it;
    with `split`, the tensors are this rank's dim-0 shards of tensors sharded over the process group."""

    def __init__(self, tensors: list[Tensor], granularity: str, split: bool = False) -> None:
        if not tensors:
            raise ValueError("a flat layout needs at least one tensor")
        self.granularity, self.split = granularity, split
        self.rows_span_ranks = split and granularity == "tensor"
        self.shapes = [t.shape for t in tensors]
        self.strides = [t.stride() for t in tensors]
        rows = [as_rows(t.detach(), granularity) for t in tensors]
        self.row_counts = [r.shape[0] for r in rows]
        self.numels = [r.numel() for r in rows]
        self.offsets = list(itertools.accumulate([0, *self.numels]))[:-1]
        self.row_starts = list(itertools.accumulate([0, *self.row_counts]))
        self.numel, self.num_rows = sum(self.numels), sum(self.row_counts)
        self.device, self.dtype = tensors[0].device, tensors[0].dtype
        lengths = [r.shape[1] for r in rows for _ in range(r.shape[0])]
        self.row_lengths = torch.tensor(lengths, dtype=torch.int64, device=self.device)
        self.tensor_numels = torch.tensor(self.numels, dtype=torch.int64, device=self.device)  # here
        self.tensor_sizes = reduce_tensor_(self.tensor_numels.clone()) if split else self.tensor_numels  # whole

    def empty(self) -> Tensor:
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Each tensor as a view into `flat`, with its own shape and strides (channels-last stays so)."""
        return [flat.as_strided(shape, stride, offset)
                for shape, stride, offset in zip(self.shapes, self.strides, self.offsets)]

    def row_views(self, flat: Tensor) -> list[Tensor]:
        """Each tensor's `(rows, cols)` view into `flat`."""
        return [flat[o:o + n].view(r, -1) for o, n, r in zip(self.offsets, self.numels, self.row_counts)]

    def table_views(self, table: Tensor) -> list[Tensor]:
        """Each tensor's rows of a per-row table `(R, ...)`."""
        return [table[a:b] for a, b in zip(self.row_starts[:-1], self.row_starts[1:])]

    def per_element(self, per_row: Tensor) -> Tensor:
        """A per-row value `(R,)` repeated over each row's elements `(N,)`."""
        return torch.repeat_interleave(per_row, self.row_lengths, output_size=self.numel)

    def per_tensor_element(self, per_tensor: Tensor) -> Tensor:
        """A per-tensor value `(T,)` repeated over each tensor's elements `(N,)`."""
        return torch.repeat_interleave(per_tensor, self.tensor_numels, output_size=self.numel)

    def row_index(self) -> Tensor:
        """The row of every element `(N,)`, int32."""
        rows = torch.arange(self.num_rows, dtype=torch.int32, device=self.device)
        return self.per_element(rows)

    def row_reduce(self, values: Tensor, reduce: str) -> Tensor:
        """`sum` or `max` of each row of a flat buffer, `(R,)` (over every rank's part of rows that span them)."""
        rows = torch.segment_reduce(values, reduce, lengths=self.row_lengths, unsafe=True)
        return reduce_tensor_(rows, reduce) if self.rows_span_ranks else rows

    def tensor_reduce(self, values: Tensor) -> Tensor:
        """Sum of each tensor's elements of a flat buffer, `(T,)` (over every rank's shard of it)."""
        sums = torch.segment_reduce(values, "sum", lengths=self.tensor_numels, unsafe=True)
        return reduce_tensor_(sums) if self.split else sums


def alias(params: list[Tensor], layout: FlatLayout) -> Tensor | None:
    """Move `params` into one flat buffer (their values kept) and make each a view of it with its own shape
    and strides; the buffer, or None when a parameter cannot be re-pointed (a DTensor of FSDP)."""
    if any(type(p.data) is not Tensor for p in params):
        return None
    flat = layout.empty()
    for p, view in zip(params, layout.views(flat)):
        view.copy_(p.data)
        p.data = view
    return flat


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass
class FlatLevels:
    """The level tables of every row of a layout, and what searching them needs."""

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


def _padded(table: Tensor, width: int) -> Tensor:
    pad = torch.full((table.shape[0], width - table.shape[1]), math.inf, dtype=table.dtype, device=table.device)
    return torch.cat([table, pad], dim=1).contiguous()


def make_levels(table: Tensor, steps: Tensor | None, layout: FlatLayout) -> FlatLevels:
    """The levels of a layout from their tables (and, for uniform levels, their steps): what searching needs."""
    if steps is not None:
        return FlatLevels(table.contiguous(), steps, layout.per_element(steps), None, None)
    stride = search_stride(table.shape[1])
    bounds = (table[:, 1:] + table[:, :-1]) / 2
    return FlatLevels(table.contiguous(), None, None, _padded(bounds, stride).view(-1),
                      _padded(table, stride).view(-1))


class FlatQuantizer:
    """The shared quantizer (`qatbench.quant`) over a whole flat layout: levels, hard quantization, indices.

    Its constants (the grid coefficients, LSBQ's sign patterns) are made once, on the layout's device."""

    def __init__(self, config: QuantizerConfig, layout: FlatLayout) -> None:
        self.config, self.layout = config, layout
        self.m = num_levels(config.bits)
        self.first = -(self.m - 1) / 2
        device, dtype = layout.device, layout.dtype
        self.coefficients = grid_coefficients(self.m, dtype, device)
        self.signs = (torch.tensor(list(itertools.product((-1.0, 1.0), repeat=config.bits)), dtype=dtype,
                                   device=device).T.contiguous() if config.bits != TERNARY else None)
        self.ternary_lsbq = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device=device)
        self.row_counts = layout.row_reduce(torch.ones(layout.numel, dtype=dtype, device=device), "sum")
        # where each element's row starts in the searched tables (int32), for level sets that are searched
        self.row_start = layout.row_index().mul_(search_stride(self.m)) if config.scheme != "uniform" else None

    def _row_mean_abs(self, flat: Tensor) -> Tensor:
        return self.layout.row_reduce(flat.abs(), "sum") / self.row_counts

    def levels(self, latent: Tensor) -> FlatLevels:
        """The levels of every row of the flat `latent` buffer."""
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
        return (torch.stack(basis, dim=1) @ self.signs).sort(dim=1).values

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
        """In place: the coefficient `c_k` of the nearest uniform level to `w / s`: the nearest half-integer
        `floor(u) + 1/2` (even m) or integer (odd m), clamped to `[c_0, -c_0]`; a tie goes up."""
        nearest = scaled.floor_().add_(0.5) if self.m % 2 == 0 else scaled.round_()
        return nearest.clamp_(self.first, -self.first)

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
        """`(q_lo, q_hi)`: the levels around each element (both the end level outside `[q_1, q_m]`)."""
        if levels.steps is not None:
            steps = levels.element_steps
            j = (values / steps).sub_(self.first).floor_().clamp_(0, self.m - 2).add_(self.first)
            return j * steps, j.add_(1).mul_(steps)
        above = self._search(values, levels.padded, self.m + 1)  # w lies in (q[above - 1], q[above]]
        flat_table = levels.padded
        low = flat_table.index_select(0, torch.maximum(above - 1, self.row_start))
        high = flat_table.index_select(0, torch.minimum(above, self.row_start + (self.m - 1)))
        return low, high
