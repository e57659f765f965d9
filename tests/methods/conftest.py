"""Build a method around a single quantized parameter, so its rule can be checked by hand."""

from __future__ import annotations

import pytest
import torch

from qatbench.params import build_config
from qatbench.quant import QuantizerConfig
from qatbench.registry import METHODS


@pytest.fixture
def make_method():
    def build(name: str, weight: list[list[float]], lr: float = 0.1, bits: int = 2,
              granularity: str = "tensor", total_steps: int = 100, **config):
        param = torch.nn.Parameter(torch.tensor(weight))
        optimizer = torch.optim.SGD([{"params": [param], "quant": True}], lr=lr)
        method_cls = METHODS.get(name)
        method = method_cls(build_config(method_cls.Config, config, name), optimizer,
                            QuantizerConfig(bits=bits, granularity=granularity), total_steps, torch.Generator())
        return method, param

    return build


def set_grad(param: torch.nn.Parameter, grad: list[list[float]]) -> None:
    param.grad = torch.tensor(grad)
