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

The quantizer over a layout (levels, rounding, ties) is `qatbench.quant.Quantizer`.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .distributed import reduce_tensor_


def as_rows(weight: Tensor, granularity: str) -> Tensor:
    """A 2-D *view* of `weight` (writes reach the weight): `(out_channels, rest)` per channel,
    `(1, numel)` per tensor. A channels-last conv weight is viewed in its memory order
    (out, h, w, in), which keeps each output channel in one row."""
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.permute(0, 2, 3, 1)
    if granularity == "channel" and weight.dim() > 1:
        return weight.view(weight.shape[0], -1)
    return weight.view(1, -1)


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
