"""A method step costs a fixed number of operations, whatever the number of tensors, and reads nothing from
the device outside level refreshes (so it never waits on the host and a CUDA graph can capture it)."""

import pytest
import torch

from qatbench.opcount import HOST_DATA, base_step_ops, count_refresh, count_step, refresh_ops, use_foreach
from qatbench.params import build_config
from qatbench.quant import TERNARY, QuantizerConfig
from qatbench.registry import METHODS

RESNET20 = ([(16, 3, 3, 3)] + [(16, 16, 3, 3)] * 6 + [(32, 16, 3, 3)] + [(32, 32, 3, 3)] * 5
            + [(64, 32, 3, 3)] + [(64, 64, 3, 3)] * 5 + [(10, 64)])
TARGET = {"ste": 40, "binaryrelax": 40, "parq": 40, "talr": 60, "fogzo": 60, "nspsa": 60}  # over the base step


def _method(name, shapes, quantizer):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(0.1 * torch.randn(s, generator=generator)) for s in shapes]
    optimizer = torch.optim.SGD([{"params": params, "quant": True}], lr=0.01, momentum=0.9, weight_decay=1e-4)
    use_foreach(optimizer)
    cls = METHODS.get(name)
    return cls(build_config(cls.Config, {}, name), optimizer, quantizer, 10**6, generator), params, optimizer


def _counted_step(name, shapes, scheme, granularity):
    quantizer = QuantizerConfig(bits=2, scheme=scheme, granularity=granularity)
    method, params, optimizer = _method(name, shapes, quantizer)

    def closure():  # a stand-in forward: one operation, counted apart from the method's
        return params[0].sum()

    for _ in range(4):  # QAT starts and refreshes its levels at t = 0; t = 4 is no refresh step
        for p in params:
            p.grad = torch.full_like(p, 0.01)
        method.step(closure)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    return count_step(method.step, closure), base_step_ops(optimizer), refresh_ops(method)


@pytest.mark.parametrize("scheme", ["uniform", "lsbq"])
@pytest.mark.parametrize("name", sorted(TARGET))
def test_the_step_is_within_its_budget_of_operations_and_reads_nothing_back(name, scheme):
    counter, base, _ = _counted_step(name, RESNET20, scheme, "tensor")
    extra = counter.total("step") - base
    assert extra <= TARGET[name], dict(counter.counts["step"])
    assert counter.host_reads() == 0, dict(counter.counts["step"])
    assert counter.total("probes") == (2 if name in ("fogzo", "nspsa") else 0)  # 2n forwards, n = 1


@pytest.mark.parametrize("scheme", ["uniform", "lsbq"])
@pytest.mark.parametrize("name", ["ste", "parq", "talr", "fogzo"])
def test_the_operations_do_not_grow_with_the_number_of_tensors(name, scheme):
    small, small_base, small_refresh = _counted_step(name, RESNET20, scheme, "channel")
    large, large_base, large_refresh = _counted_step(name, RESNET20 * 3, scheme, "channel")
    assert small.total("step") - small_base == large.total("step") - large_base
    assert small_refresh == large_refresh and small_refresh < 60


@pytest.mark.parametrize("bits", [1, 2, 4, TERNARY])
@pytest.mark.parametrize("scheme", ["uniform", "lsbq"])
def test_a_level_refresh_builds_nothing_from_python_data_and_reads_nothing_back(scheme, bits):
    method, params, _ = _method("parq", RESNET20, QuantizerConfig(bits=bits, scheme=scheme, granularity="channel"))
    for p in params:
        p.grad = torch.zeros_like(p)
    method.step(None)  # QAT starts: the latent copies and their tables exist
    counter = count_refresh(method)
    assert counter.total("step") > 0
    assert counter.counts["step"][HOST_DATA] == 0 and counter.host_reads() == 0, dict(counter.counts["step"])
