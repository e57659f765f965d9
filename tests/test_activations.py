"""Activation quantization and learned steps (LSQ, TALR's modified LSQ): the rules by hand on small tensors, and the
runs that use them (export -> eval bit for bit, resume bit for bit, refusals)."""

from __future__ import annotations

import math

import pytest
import torch

from qatbench.activations import ActivationQuantizer, calibrate, lsq, talr
from qatbench.cli import main
from qatbench.params import build_config
from qatbench.quant import QuantizerConfig
from qatbench.registry import METHODS
from qatbench.results import load_records


def test_lsq_forward_and_both_gradients_by_hand():
    # signed 2 bits: Q_N = 2, Q_P = 1; x / s = [-2, 0.6, 1.48, 4]
    x = torch.tensor([-1.0, 0.3, 0.74, 2.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    y = lsq(x, step, -2, 1, gradient_scale=0.5)
    assert y.tolist() == [-1.0, 0.5, 0.5, 0.5]  # round(clip(x / s)) * s
    y.sum().backward()
    # LSQ's straight-through estimator: 1 strictly inside (-Q_N, Q_P), 0 on and outside its ends
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 0.0]
    # ds = g * [-Q_N at or below, round(u) - u inside, Q_P at or above]: (-2 + 0.4 + 1 + 1) * 0.5
    assert step.grad.item() == pytest.approx(0.2, abs=1e-6)


def test_lsq_sends_a_tie_to_the_lower_level_and_clips_below():
    x = torch.tensor([0.25, -5.0])
    assert lsq(x, torch.tensor(0.5), -2, 1, 1.0).tolist() == [0.0, -1.0]  # u = 0.5 goes down; u = -10 clips to -2


def test_talrs_modified_quantizer_is_its_formula():
    # unsigned 2 bits: (alpha, beta, gamma) = (0, 3, 4); gamma x / s = [0.5, 1.0, 2.5, -1.5]
    x = torch.tensor([0.1, 0.2, 0.5, -0.3], requires_grad=True)
    step = torch.tensor(0.8, requires_grad=True)
    y = talr(x, step, 0, 3, 4.0, gradient_scale=1.0)
    assert y.tolist() == [0.0, 0.25, 0.5, 0.0]  # round(clip(gamma x / s, 0, 3)) / gamma, no post-scaling by s
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([1.25, 1.25, 1.25, 0.0])  # 1 / s inside, 0 clipped
    assert step.grad.item() == pytest.approx(-(0.1 + 0.2 + 0.5) / 0.8**2)  # -x / s^2 inside


@pytest.mark.parametrize("form, init, expected", [
    ("lsq", "lsq", lambda x: 2 * x.abs().mean() / math.sqrt(3)),
    ("talr", "3std", lambda x: 3 * x.std() / math.sqrt(1 - 2 / math.pi)),
    ("lsq", "3std", lambda x: 3 * x.std() / math.sqrt(1 - 2 / math.pi) / 4),  # TALR's grid step, in LSQ's form
])
def test_the_first_training_forward_sets_the_step(form, init, expected):
    quantizer = ActivationQuantizer(2, signed=False, form=form, init=init)
    x = torch.rand(8, 5)
    quantizer(x)
    assert quantizer.step.item() == pytest.approx(expected(x.double()).item(), rel=1e-6) and quantizer.ready
    again = quantizer.step.item()
    quantizer(x * 10)
    assert quantizer.step.item() == again  # set once


def test_calibration_sets_the_steps_from_batches_and_turns_the_quantizers_on():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    from qatbench.activations import attach

    [quantizer] = attach([(model[0], True)], 2, "lsq", "lsq")
    quantizer.enabled = False
    batches = [(torch.randn(6, 4), None) for _ in range(3)]
    calibrate(model, model, batches, count=2)
    steps = [2 * b.double().abs().mean() / math.sqrt(1) for b, _ in batches[:2]]
    assert quantizer.enabled and quantizer.ready and quantizer.step.item() == pytest.approx(float(sum(steps) / 2))


def test_learned_weight_steps_take_lsqs_gradient_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[0.2, -0.9, 0.55, 3.0]]))
    steps_group = {"params": [], "scales": True, "weight_decay": 0.0}
    optimizer = torch.optim.SGD([{"params": [weight], "quant": True}, steps_group], lr=0.0)
    config = QuantizerConfig(2, "uniform", "tensor", scale="learned", step_init="lsq")
    method = METHODS.get("ste")(build_config(METHODS.get("ste").Config, {}, "ste"), optimizer, config, 10,
                                torch.Generator())
    weight.grad = torch.zeros_like(weight)
    method.step()  # QAT starts: s = 2 mean|w| / sqrt(Q_P) = 2 * 1.1625 / 1
    step = method.weight_steps.item()
    assert step == pytest.approx(2.325, rel=1e-6)
    assert weight.data[0].tolist() == pytest.approx([0.0, 0.0, 0.0, step])  # u = [0.086, -0.39, 0.24, 1.29]
    weight.grad = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    method.step()
    u = torch.tensor([0.2, -0.9, 0.55, 3.0]) / step
    slope = torch.tensor([0.0 - u[0], 0.0 - u[1], 0.0 - u[2], 1.0])  # round(u) - u inside [-2, 1], Q_P = 1 above
    expected = (torch.tensor([1.0, 2.0, -1.0, 0.5]) * slope).sum() / math.sqrt(4 * 1)
    assert method.weight_steps.grad.item() == pytest.approx(expected.item(), rel=1e-5)
    assert method.latent_params[0].grad is None  # used and released; the masked gradient reached the latent weights


@pytest.mark.parametrize("method", ["parq", "binaryrelax"])
def test_a_method_whose_levels_come_from_its_prox_cannot_learn_steps(method, capsys):
    assert main(["run", "--method", method, "--task", "mnist-mlp", "--bits", "2", "--scale", "learned"]) == 2
    err = capsys.readouterr().err
    assert f"method {method!r} cannot learn its steps" in err and "methods that learn them: fogzo" in err


def test_learned_steps_need_two_bits_and_a_uniform_grid(capsys):
    assert main(["run", "--method", "ste", "--task", "mnist-mlp", "--bits", "1", "--scale", "learned"]) == 2
    assert "learned steps (LSQ) need at least 2 bits, not 1" in capsys.readouterr().err


W2A2 = ["--task", "mnist-mlp", "--bits", "2", "--act-bits", "2", "--recipe", "smoke", "--epochs", "2",
        "--no-download"]


def test_w2a2_runs_export_and_evaluate_to_their_records_bit_for_bit(idx_root, isolated_data_env, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--method", "fp", "ste", "parq", "rtn", "talr", *W2A2, "--data-root", str(idx_root),
                 "--out", str(out)]) == 0
    assert main(["run", "--method", "ste", "talr", "talr-baseline", "fogzo", *W2A2, "--scale", "learned",
                 "--data-root", str(idx_root), "--out", str(out)]) == 0
    records = load_records([out])
    assert len(records) == 9 and all(r.status == "ok" for r in records)
    for record in records:
        if record.quantized:
            assert record.spec["activations"]["bits"] == 2 and record.exactness["passed"] is True
            steps = [k for k in __import__("safetensors.torch").torch.load_file(
                str(out / record.task / record.export["file"])) if k.endswith("input_quantizer.step")]
            assert len(steps) == 2  # both layers' input steps are in the export
        else:
            assert "activations" not in record.spec  # the full-precision baseline stays full precision
    capsys.readouterr()
    exports = [str(out / r.task / r.export["file"]) for r in records]
    assert main(["eval", *exports, "--data-root", str(idx_root)]) == 0
    assert capsys.readouterr().out.count("bit for bit") == 9


@pytest.mark.parametrize("form, forward, backward", [("lsq", 5, 9), ("talr", 7, 12)])
def test_an_activation_quantizer_costs_a_constant_number_of_kernels(form, forward, backward):
    """LSQ: forward div, sub, ceil, clamp, mul; backward two compares, an and, three products, a difference, a sum
    over the activation, and one product of scalars. TALR: two more scalar operations forward (gamma / s), and its
    step's gradient (-sum(g u) / (gamma s)) three more scalar ones backward."""
    from qatbench.opcount import DispatchCounter

    quantizer = ActivationQuantizer(2, signed=False, form=form)
    quantizer(torch.rand(4, 8))  # initialized
    x = torch.rand(4, 8, requires_grad=True)
    counter = DispatchCounter()
    with counter:
        y = counter.during("forward", lambda: quantizer(x))
        grad = torch.ones_like(y)
        counter.during("backward", lambda: y.backward(grad))
    assert counter.total("forward") == forward
    data_ops = {k: v for k, v in counter.counts["backward"].items() if "detach" not in k and "view" not in k}
    assert sum(data_ops.values()) == backward, data_ops
