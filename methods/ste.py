"""STE / BinaryConnect: train with hard-quantized weights, update the latent ones."""

from __future__ import annotations

from torch import Tensor

from qatbench.method import EVERY_GRANULARITY, ProxMethod
from qatbench.registry import METHODS


@METHODS.register("ste")
class STE(ProxMethod):
    """BinaryConnect (Courbariaux et al., NeurIPS 2015) with the straight-through estimator.

    Prox map `ProxHardQuant` of the PARQ reference: `p = hardquant(w) = Q[nearest(w)]`.
    The gradient taken at `p` is applied to the latent `w` unchanged (identity STE):
    `w <- base_step(w, grad L(p))`.

    With learned steps (`--scale learned`) this is LSQ (Esser et al., ICLR 2020): `p = round(clip(w / s,
    -Q_N, Q_P)) s` on each row's integer grid, the weights' gradient zeroed outside the clip range and the
    steps trained with LSQ's gradient (`ProxMethod._lsq_gradients`), in their own parameter group.
    """

    sharded_granularities = EVERY_GRANULARITY  # elementwise prox on flat buffers: shards reduce (--fsdp)
    step_sizes = frozenset({"estimated", "learned"})

    def prox(self, latent: Tensor, levels: Tensor, t: int) -> Tensor:
        return self.nearest_level(latent, levels)

    def prox_flat(self, latent: Tensor, t: int, out: Tensor) -> None:
        self.hard_quantize(latent, out=out)
