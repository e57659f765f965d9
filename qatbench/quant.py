"""The shared quantizer: one for every method, so that comparisons are fair.

Every function works on a 2-D *row view* of a weight: one row per output channel
for per-channel quantization (conv weights flattened to `(out, in*kh*kw)`), a
single row for per-tensor quantization. Levels are a `(rows, m)` tensor, sorted
along dim 1.

Level sets (after the PARQ reference `UnifQuantizer`, MIT):

* uniform, b bits: `q_max = min(b * mean|w|, max|w|)`,
  `s = q_max / (2^(b-1) - 1/2)`, levels `(k - (2^b - 1)/2) * s` for k = 0..2^b-1.
  For b = 1 this is `{-q_max, +q_max}`.
* uniform ternary: `s = max|w| / 1.5`, levels `{-s, 0, s}`.

One definition of a uniform level serves the level table, the closed-form fast paths and
the exported model: `level_k = fl(c_k * s)`, the row's step `s` times the coefficient
`c_k = k - (m - 1)/2` (an exact half-integer or integer), rounded once. The step is
recovered exactly from a table (`grid`: `s = 2 * level` at `c = 1/2`, or the level at
`c = 1` for ternary), so a weight the fast path quantizes is bitwise an entry of its table.
* LSBQ, b bits (greedy least-squares binary quantization, Pouransari et al. 2020):
  `r = w`; for j = 1..b: `v_j = mean|r|`, `r -= v_j sign(r)` (sign(0) = +1);
  levels `sort{+-v_1 +- ... +- v_b}`.
* LSBQ ternary: `v = 1.1 mean|w|`, levels `{-v, 0, v}`.

Hard quantization maps each weight to its nearest level,
`Q[searchsorted(midpoints(Q), w)]` (a weight exactly on a midpoint goes down).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import torch
from torch import Tensor

from .errors import QatbenchError

TERNARY = 0
"""`bits == TERNARY` selects the three-level set {-s, 0, s} ("T" on the command line)."""

MAX_BITS = 8


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

    def __post_init__(self) -> None:
        if self.bits != TERNARY and not 1 <= self.bits <= MAX_BITS:
            raise QatbenchError(f"invalid bits {self.bits}; valid choices: 1..{MAX_BITS} or T (ternary)")

    @property
    def evenly_spaced(self) -> bool:
        """Uniform levels (ternary included) are a grid with a positive step: closed-form rounding applies."""
        return self.scheme == "uniform"


def as_rows(weight: Tensor, granularity: str) -> Tensor:
    """A 2-D *view* of `weight` (writes reach the weight): `(out_channels, rest)` per channel,
    `(1, numel)` per tensor. A channels-last conv weight is viewed in its memory order
    (out, h, w, in), which keeps each output channel in one row."""
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.permute(0, 2, 3, 1)
    if granularity == "channel" and weight.dim() > 1:
        return weight.view(weight.shape[0], -1)
    return weight.view(1, -1)


def grid_coefficients(m: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """`c_k = k - (m - 1) / 2`, k = 0..m-1: the exact multiples of the step that uniform levels are."""
    return torch.arange(m, dtype=dtype, device=device) - (m - 1) / 2


def _step_floor(dtype: torch.dtype) -> float:
    """The smallest step: twice the smallest normal number, so that half a step is still normal (exact)."""
    return 2 * torch.finfo(dtype).tiny


def uniform_levels(rows: Tensor, bits: int) -> Tensor:
    """Uniform symmetric levels `fl(c_k * s)`, `(rows, m)`."""
    magnitude = rows.abs()
    abs_max = magnitude.amax(dim=1, keepdim=True)
    if bits == TERNARY:
        q_max, half_range = abs_max, 1.5
    else:
        q_max = torch.minimum(bits * magnitude.mean(dim=1, keepdim=True), abs_max)
        half_range = 2 ** (bits - 1) - 0.5
    step = (q_max / half_range).clamp_(min=_step_floor(rows.dtype))
    return grid_coefficients(num_levels(bits), rows.dtype, rows.device) * step


def lsbq_levels(rows: Tensor, bits: int) -> Tensor:
    """Greedy LSBQ levels, `(rows, m)`, sorted."""
    if bits == TERNARY:
        v = 1.1 * rows.abs().mean(dim=1, keepdim=True)
        return torch.cat([-v, torch.zeros_like(v), v], dim=1)
    residual = rows.clone()
    coefficients = []
    for _ in range(bits):
        v = residual.abs().mean(dim=1, keepdim=True)
        sign = torch.where(residual >= 0, 1.0, -1.0).to(rows.dtype)
        residual -= v * sign
        coefficients.append(v)
    basis = torch.cat(coefficients, dim=1)  # (rows, b)
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=bits)), dtype=rows.dtype, device=rows.device)
    return (basis @ signs.T).sort(dim=1).values  # (rows, 2^b)


def estimate_levels(rows: Tensor, config: QuantizerConfig) -> Tensor:
    """The level table of `rows` under `config`."""
    with torch.no_grad():
        if config.scheme == "lsbq":
            return lsbq_levels(rows, config.bits)
        return uniform_levels(rows, config.bits)


def midpoints(levels: Tensor) -> Tensor:
    """Decision boundaries between neighbouring levels, `(rows, m - 1)`, contiguous."""
    return ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()


def grid(levels: Tensor) -> tuple[float, Tensor]:
    """`(c_0, s)` of uniform levels `fl(c_k * s)`: the first coefficient and each row's step `(rows, 1)`,
    recovered exactly (halving and doubling are exact): `s = 2 * level` at `c = 1/2` for even m,
    the level at `c = 1` for odd m (ternary)."""
    m = levels.shape[1]
    if m % 2 == 0:
        return -(m - 1) / 2, levels[:, m // 2: m // 2 + 1] * 2
    return -(m - 1) / 2, levels[:, (m + 1) // 2: (m + 1) // 2 + 1]


def grid_index(rows: Tensor, levels: Tensor) -> Tensor:
    """For uniform levels: `clamp(round(w / s - c_0), 0, m - 1)`, the nearest level's index as floats,
    in a few elementwise kernels instead of a binary search. A weight within a rounding error of a
    midpoint may go to either neighbour."""
    first, step = grid(levels)
    return (rows / step).sub_(first).round_().clamp_(0, levels.shape[1] - 1)


def level_indices(rows: Tensor, levels: Tensor, bounds: Tensor | None = None, evenly_spaced: bool = False) -> Tensor:
    """Integer index of the nearest level of every weight, `(rows, cols)` int64.

    `bounds` are `midpoints(levels)`, which methods cache between level refreshes;
    `evenly_spaced` takes the closed form of `grid_index`."""
    if evenly_spaced:
        return grid_index(rows, levels).long()
    return torch.searchsorted(midpoints(levels) if bounds is None else bounds, rows.contiguous())


def hard_quantize(rows: Tensor, levels: Tensor, bounds: Tensor | None = None, out: Tensor | None = None,
                  evenly_spaced: bool = False) -> Tensor:
    """Nearest level of every weight, `Q[searchsorted(midpoints(Q), w)]` (a weight exactly on a
    midpoint goes down), written into `out` when given; with `evenly_spaced` (uniform levels),
    `fl((c_0 + grid_index(w)) * s)`, bitwise the table's entry."""
    if evenly_spaced:
        first, step = grid(levels)
        return torch.mul(grid_index(rows, levels).add_(first), step, out=out)
    return torch.gather(levels, 1, level_indices(rows, levels, bounds), out=out)


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
