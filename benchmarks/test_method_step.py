"""pytest-benchmark: the method step on a fixed set of tensors (the weights of a CIFAR ResNet-20).

    pytest benchmarks --benchmark-enable --benchmark-autosave      # measure and save
    pytest benchmarks --benchmark-enable --benchmark-compare        # against the last save

The test suite runs these once each (`--benchmark-disable`, pyproject's default), so
CI checks that they work without timing anything. `fp` is the plain base-optimizer
step: the other rows are read against it.
"""

from __future__ import annotations

import pytest
import torch

from qatbench.params import build_config
from qatbench.quant import QuantizerConfig, as_rows, estimate_levels
from qatbench.registry import METHODS

# conv weights of ResNet-20 (first conv, 3 stages of 3 blocks x 2 convs) and its classifier
SHAPES = ([(16, 3, 3, 3)] + [(16, 16, 3, 3)] * 6 + [(32, 16, 3, 3)] + [(32, 32, 3, 3)] * 5
          + [(64, 32, 3, 3)] + [(64, 64, 3, 3)] * 5 + [(10, 64)])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METHOD_NAMES = METHODS.names()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_step(benchmark, name, granularity, device):
    generator = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(0.1 * torch.randn(s, generator=generator, device=device)) for s in SHAPES]
    grads = [0.01 * torch.randn(s, generator=generator, device=device) for s in SHAPES]
    optimizer = torch.optim.SGD([{"params": params, "quant": True}], lr=0.01, momentum=0.9)
    cls = METHODS.get(name)
    method = cls(build_config(cls.Config, {}, name), optimizer,
                 QuantizerConfig(bits=2, granularity=granularity), 10**6, generator)

    def closure() -> torch.Tensor:  # a cheap stand-in for the forward pass FOGZO probes with
        return sum(p.square().sum() for p in params)

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        method.step(closure)
        _sync(device)

    for _ in range(3):  # past the first QAT step, which allocates the latent copies
        step()
    benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["uniform", "lsbq"])
def test_level_refresh(benchmark, scheme, device):
    generator = torch.Generator(device).manual_seed(0)
    rows = [as_rows(torch.randn(s, generator=generator, device=device), "channel") for s in SHAPES]
    config = QuantizerConfig(bits=2, scheme=scheme)

    def refresh() -> None:
        for r in rows:
            estimate_levels(r, config)
        _sync(device)

    benchmark(refresh)
