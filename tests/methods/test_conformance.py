"""Every registered proximal method, on every quantizer configuration: its flat step (`prox_flat`, all tensors at
once) computes bit for bit what its per-tensor rule (`prox`, the definition) computes. A new method is tested
here without editing a list."""

from __future__ import annotations

import pytest
import torch

from qatbench.method import ProxMethod
from qatbench.params import build_config
from qatbench.quant import TERNARY, QuantizerConfig
from qatbench.registry import METHODS

PROX_METHODS = [name for name in METHODS.names() if issubclass(METHODS.get(name), ProxMethod)]
CONFIGS = [QuantizerConfig(bits, scheme, granularity) for scheme in ("uniform", "lsbq")
           for granularity in ("channel", "tensor") for bits in (1, 2, 3, 4, TERNARY)]
SHAPES = [(6, 5), (4, 3, 3, 3), (7,)]  # a linear, a conv (flattened per output channel) and a 1-D tensor
STEPS = 40


def _method(name: str, config: QuantizerConfig):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator) * scale)
              for shape, scale in zip(SHAPES, (1.0, 0.05, 3.0))]
    optimizer = torch.optim.SGD([{"params": params, "quant": True}], lr=0.05, momentum=0.9)
    method_cls = METHODS.get(name)
    method = method_cls(build_config(method_cls.Config, {}, name), optimizer, config, STEPS, torch.Generator())
    method.step()  # QAT starts: latent weights and levels exist
    return method, params


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scheme}-{c.granularity}-b{c.bits or 'T'}")
@pytest.mark.parametrize("name", PROX_METHODS)
def test_the_flat_step_is_the_per_tensor_rule_bit_for_bit(name, config):
    method, params = _method(name, config)
    latent = method.prox_input(method.latent_flat)
    for t in (0, 1, STEPS // 4, STEPS // 2, 3 * STEPS // 4 - 1, STEPS - 1, STEPS):  # before, across, after anneals
        out = torch.empty_like(latent)
        method.prox_flat(latent, t, out)
        for rows, table, got in zip(method.layout.row_views(latent), method.levels, method.layout.row_views(out)):
            assert torch.equal(got, method.prox(rows, table, t)), (t, rows.shape)


def test_every_prox_method_is_covered():
    assert {"ste", "binaryrelax", "parq", "fogzo", "talr"} <= set(PROX_METHODS)
