"""n-SPSA: the plain zeroth-order baseline of the FOGZO paper."""

from __future__ import annotations

from qatbench.methods.fogzo import FOGZO, ZOConfig
from qatbench.registry import METHODS


@METHODS.register("nspsa")
class NSPSA(FOGZO):
    """n-SPSA (Spall 1992; the zeroth-order baseline of FOGZO, arXiv 2510.23926): FOGZO with `beta = 0`.

    `G = (1/n) sum_i [L(Q(w + eps u_i)) - L(Q(w - eps u_i))] / (2 eps) u_i`, `u_i` unit-variance
    noise, `eps = alpha / (2 sqrt 3)` quantizer steps; `G` replaces the gradient in the base
    optimizer's update of the latent `w`, `p = hardquant(w)`. The STE gradient is not used
    (the harness still computes it). Cost: 2n forward passes per step.
    """

    Config = ZOConfig

    def beta(self, t: int) -> float:
        return 0.0
