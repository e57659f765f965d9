import torch

from qatbench.quant import hard_quantize
from tests.methods.conftest import set_grad


def test_step_updates_latent_with_gradient_at_quantized_weights(make_method):
    method, p = make_method("ste", [[0.3, -0.7, 1.2, -0.1]], lr=0.1, bits=1)
    set_grad(p, [[1.0, -1.0, 2.0, 0.5]])
    method.step()
    latent = torch.tensor([[0.2, -0.6, 1.0, -0.15]])  # w - lr * g
    torch.testing.assert_close(method.latent[0], latent)
    # 1 bit: q_max = min(mean|w|, max|w|) = 0.4875 -> p = +-0.4875 by sign
    torch.testing.assert_close(p.data, torch.tensor([[0.4875, -0.4875, 0.4875, -0.4875]]))

    # the next step restores the latent weights before the base step
    set_grad(p, [[0.0, 0.0, 0.0, 1.0]])
    method.step()
    torch.testing.assert_close(method.latent[0], latent - torch.tensor([[0.0, 0.0, 0.0, 0.1]]))


def test_model_weights_are_exactly_quantized_after_every_step(make_method):
    method, p = make_method("ste", torch.randn(8, 16).tolist(), bits=2, granularity="channel")
    for _ in range(5):
        p.grad = torch.randn_like(p)
        method.step()
        table = method.levels[0]  # the method's own levels: every weight of a row is bitwise one of its row's 4
        assert table.shape == (8, 4) and all(torch.isin(row, levels).all() for row, levels in zip(p.data, table))


def test_levels_refresh_only_every_quant_period(make_method):
    method, p = make_method("ste", torch.randn(4, 4).tolist(), quant_period=3)
    p.grad = torch.randn_like(p)
    method.step()
    first = method.levels[0].clone()
    for _ in range(2):
        p.grad = torch.randn_like(p) * 10
        method.step()
        torch.testing.assert_close(method.levels[0], first)
    p.grad = torch.randn_like(p) * 10
    method.step()  # QAT step 3: refresh
    assert not torch.equal(method.levels[0], first)


def test_warmup_trains_in_full_precision(make_method):
    method, p = make_method("ste", [[0.3, -0.7]], lr=0.1, warmup=2)
    for _ in range(2):
        set_grad(p, [[1.0, 1.0]])
        method.step()
    torch.testing.assert_close(p.data, torch.tensor([[0.1, -0.9]]))
    assert method.latent == []


def test_finalize_hard_quantizes_the_latent_weights(make_method):
    method, p = make_method("ste", torch.randn(4, 8).tolist(), bits=2)
    p.grad = torch.randn_like(p)
    method.step()
    method.finalize()
    torch.testing.assert_close(p.data, hard_quantize(method.latent[0].view(1, -1), method.levels[0]).view(4, 8))
