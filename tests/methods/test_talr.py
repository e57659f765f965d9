import pytest
import torch

from qatbench.params import build_config
from qatbench.quant import QuantizerConfig
from qatbench.registry import METHODS
from tests.methods.conftest import set_grad


def _talr(optimizer_name="sgd", lr=0.1, weight=((-1.0, -0.4, 0.4, 1.0),), total_steps=100, **config):
    param = torch.nn.Parameter(torch.tensor(weight))
    bias = torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [param], "quant": True}, {"params": [bias], "quant": False}]
    optimizer = (torch.optim.AdamW(groups, lr=lr, weight_decay=0.0) if optimizer_name == "adamw"
                 else torch.optim.SGD(groups, lr=lr))
    cls = METHODS.get("talr")
    method = cls(build_config(cls.Config, config, "talr"), optimizer, QuantizerConfig(bits=1, granularity="tensor"),
                 total_steps, torch.Generator())
    return method, param, bias


def test_paper_rule_by_hand():
    method, _, _ = _talr(target_rate=0.5, momentum=0.5, target_schedule="constant")
    method.update(torch.tensor([1.0]), 0.5)  # K = 0.5*0.5 + 0.5*1 = 0.75; U = 0.1 + 0.1*(0.5 - 0.75)
    assert method.running_rate.item() == pytest.approx(0.75) and method.step_size.item() == pytest.approx(0.075)
    method.update(torch.tensor([0.0]), 0.5)  # K = 0.375; U = 0.075 + 0.1*0.125
    assert method.running_rate.item() == pytest.approx(0.375) and method.step_size.item() == pytest.approx(0.0875)
    for _ in range(50):
        method.update(torch.tensor([1.0]), 0.0)
    assert method.step_size.item() == 0.0  # U never goes negative


def test_momentum_rule_by_hand():
    method, _, _ = _talr(target_rate=0.5, momentum=0.5, rule="momentum")
    method.update(torch.tensor([1.0]), 0.5)  # K = 0.75; s = 0.5*1 + 0.5*1*0.5/0.75 = 5/6; U = 0.1 s
    assert method.scale.item() == pytest.approx(5 / 6) and method.step_size.item() == pytest.approx(0.1 * 5 / 6)
    method.update(torch.tensor([0.0]), 0.5)  # K = 0.375; s = 5/6 * (0.5 + 0.5*0.5/0.375)
    assert method.step_size.item() == pytest.approx(0.1 * 5 / 6 * (0.5 + 0.5 * 0.5 / 0.375))


def test_update_uses_u_in_place_of_the_lr_with_sgd():
    method, p, bias = _talr(lr=0.1)
    method.step_size.fill_(0.5)
    set_grad(p, [[1.0, -1.0, 0.0, 0.0]])
    bias.grad = torch.ones(2)
    method.step()
    torch.testing.assert_close(method.latent[0], torch.tensor([[-1.5, 0.1, 0.4, 1.0]]))
    torch.testing.assert_close(bias.data, torch.full((2,), -0.1))  # the FP group keeps the ordinary LR
    assert method.optimizer.param_groups[0]["lr"] == 0.1  # the scheduled LR is restored


def test_update_uses_adams_direction_with_adamw():
    method, p, _ = _talr("adamw", lr=1e-3)
    method.step_size.fill_(0.5)
    set_grad(p, [[2.0, -3.0, 0.0, 0.0]])
    method.step()
    # first Adam step at LR 1: m_hat / (sqrt(v_hat) + eps) = sign(g)
    torch.testing.assert_close(method.latent[0], torch.tensor([[-1.5, 0.1, 0.4, 1.0]]), atol=1e-6, rtol=0)


def test_transitions_are_counted_from_the_first_update():
    method, p, _ = _talr(lr=0.1, target_rate=0.5, momentum=0.5, target_schedule="constant")
    set_grad(p, [[0.0, -5.0, 0.0, 0.0]])
    method.step()  # levels +-0.7 from w_0, d_0 = [0, 0, 1, 1]; -0.4 -> 0.1 crosses 0: one transition in four
    assert method.running_rate.item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)  # K_1 = 0.375
    # U_1 = U_0 + eta (R - K_1) = 0.1 + 0.1 (0.5 - 0.375): the initial step size was used once
    assert method.step_size.item() == pytest.approx(0.1125)
    set_grad(p, [[0.0, 0.0, 0.0, 0.0]])
    method.step()  # no transition: K_2 = 0.5 K_1
    assert method.running_rate.item() == pytest.approx(0.1875)


def test_scales_are_frozen_after_the_first_qat_step():
    method, p, _ = _talr()
    set_grad(p, [[0.0] * 4])
    method.step()
    first = method.levels[0].clone()
    for _ in range(25):
        p.grad = torch.randn_like(p) * 10
        method.step()
    assert torch.equal(method.levels[0], first)


def test_default_target_rate_is_lambda_sqrt_bits():
    method, _, _ = _talr(rate_scale=4e-3)
    assert method.initial_target == pytest.approx(4e-3)  # the fixture quantizes to 1 bit
    assert method.running_rate.item() == pytest.approx(4e-3)


@pytest.mark.parametrize("rule", ["paper", "momentum"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_each_latent_update_is_u_times_the_base_update_at_lr_one(rule, optimizer_name):
    torch.manual_seed(0)
    weight = torch.randn(1, 16)
    method, p, _ = _talr(optimizer_name, lr=0.05, weight=weight.tolist(), rule=rule, target_rate=0.05, momentum=0.5)
    shadow = torch.nn.Parameter(weight.clone())  # the same base optimizer at LR 1, stepped in lockstep
    shadow_opt = (torch.optim.AdamW([shadow], lr=1.0, weight_decay=0.0) if optimizer_name == "adamw"
                  else torch.optim.SGD([shadow], lr=1.0))
    for _ in range(6):
        grad = torch.randn(1, 16)
        latent_before = method.latent[0].clone() if method.latent else p.data.clone()
        u_before = method.step_size.clone()
        p.grad, shadow.grad = grad.clone(), grad.clone()
        shadow.data.copy_(latent_before)
        shadow_opt.step()
        method.step()
        torch.testing.assert_close(method.latent[0], latent_before + u_before * (shadow.data - latent_before))
    assert method.step_size.item() != pytest.approx(0.05)  # U moved away from U_0 = the group's LR


def test_target_schedule_end_points():
    method, _, _ = _talr(total_steps=200, target_rate=0.01)
    assert method.target_rate(0) == pytest.approx(0.01)
    assert method.target_rate(100) == pytest.approx(0.005)
    assert method.target_rate(200) == pytest.approx(0.0)
    constant, _, _ = _talr(target_rate=0.01, target_schedule="constant")
    assert constant.target_rate(150) == 0.01
