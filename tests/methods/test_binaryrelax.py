import pytest
import torch

from qatbench.quant import hard_quantize
from tests.methods.conftest import set_grad

W0 = [[0.3, -0.7, 1.2, -0.1]]


def _step_zero_grad(method, p, times=1):
    for _ in range(times):
        set_grad(p, [[0.0] * 4])
        method.step()


def test_before_anneal_start_model_weights_are_latent(make_method):
    method, p = make_method("binaryrelax", W0, anneal_start=10, anneal_end=20)
    _step_zero_grad(method, p, 5)
    torch.testing.assert_close(p.data, torch.tensor(W0))


def test_from_anneal_end_model_weights_are_hard_quantized(make_method):
    method, p = make_method("binaryrelax", W0, anneal_start=10, anneal_end=20)
    _step_zero_grad(method, p, 21)  # last step had t = 20
    torch.testing.assert_close(p.data, hard_quantize(torch.tensor(W0), method.levels[0]))
    assert method.diagnostics()["theta"] == 1.0


def test_in_between_weights_are_the_linear_mix(make_method):
    method, p = make_method("binaryrelax", W0, anneal_start=10, anneal_end=20)
    _step_zero_grad(method, p, 16)  # last step had t = 15: theta = 0.5
    q = hard_quantize(torch.tensor(W0), method.levels[0])
    torch.testing.assert_close(p.data, 0.5 * torch.tensor(W0) + 0.5 * q)
    assert method.diagnostics()["theta"] == pytest.approx(0.5)


def test_fractions_resolve_against_total_steps(make_method):
    method, _ = make_method("binaryrelax", W0, total_steps=200, anneal_start=0.25, anneal_end=0.75)
    assert (method.anneal_start, method.anneal_end) == (50, 150)
