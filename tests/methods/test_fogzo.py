import pytest
import torch

from qatbench.methods.fogzo import unit_noise, zeroth_order_gradient
from tests.methods.conftest import set_grad

CURVATURE = torch.tensor([[1.0, 2.0, 3.0]])
CENTER = torch.tensor([[0.5, -1.0, 2.0]])
W = torch.tensor([[1.0, 1.0, 1.0]])


def quadratic(weights):
    return 0.5 * (CURVATURE * (weights[0] - CENTER) ** 2).sum()


GRADIENT = CURVATURE * (W - CENTER)  # [[0.5, 4.0, -3.0]]


def test_full_guidance_and_small_radius_returns_the_first_order_gradient():
    estimate = zeroth_order_gradient(quadratic, [W], [GRADIENT], [torch.tensor([[1e-3]])], beta=1.0, samples=1,
                                     noise="uniform", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate[0], GRADIENT, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noise", ["uniform", "gaussian"])
def test_zeroth_order_part_averages_to_the_gradient_of_a_quadratic(noise):
    estimate = zeroth_order_gradient(quadratic, [W], None, [torch.tensor([[0.1]])], beta=0.0, samples=20000,
                                     noise=noise, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate[0], GRADIENT, rtol=0.06, atol=0.1)


def test_guided_estimate_in_expectation_keeps_the_guide_direction():
    # E[G] = beta g_hat g_hat^T grad + (1 - beta) grad; with guide = grad this is grad again
    estimate = zeroth_order_gradient(quadratic, [W], [GRADIENT], [torch.tensor([[0.1]])], beta=0.5, samples=20000,
                                     noise="uniform", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate[0], GRADIENT, rtol=0.06, atol=0.1)


def test_same_seed_same_estimate_and_other_seed_differs():
    def run(seed):
        return zeroth_order_gradient(quadratic, [W], [GRADIENT], [torch.tensor([[0.1]])], beta=0.5, samples=3,
                                     noise="uniform", generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))


def test_uniform_noise_has_unit_variance_on_its_support():
    u = unit_noise(torch.empty(200000), "uniform", torch.Generator().manual_seed(0))
    assert u.abs().max() <= 3 ** 0.5 and abs(u.var().item() - 1.0) < 0.02


def test_each_step_makes_two_closure_calls_per_sample_and_replaces_the_gradient(make_method):
    method, p = make_method("fogzo", torch.randn(3, 5).tolist(), bits=2, samples=3, beta_min=0.0)
    calls = []

    def closure():
        calls.append(1)
        return (p ** 2).sum()

    p.grad = torch.ones_like(p)
    method.step(closure)  # first QAT step: saves the latent weights, no probe yet
    assert calls == []
    p.grad = torch.ones_like(p)
    latent_before = method.latent[0].clone()
    method.step(closure)
    assert len(calls) == 6
    assert not torch.allclose(method.latent[0], latent_before - 0.1 * torch.ones_like(p))  # not the STE update


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_the_probes_use_a_radius_of_alpha_eps_bar_quantizer_steps(make_method, alpha):
    # per tensor, 2 bits: mean|w| = 0.7, max|w| = 1, q_max = min(2 * 0.7, 1) = 1, step s = 1 / 1.5
    method, p = make_method("fogzo", [[-1.0, -0.4, 0.4, 1.0]], bits=2, alpha=alpha, beta_min=0.0, total_steps=10)
    seen = []

    def closure():
        seen.append(p.data.clone())  # the model holds Q(w +- eps v) while the closure runs
        return (p ** 2).sum()

    set_grad(p, [[0.0, 0.0, 0.0, 0.0]])
    method.step(closure)  # QAT starts: the levels of the unchanged w, and with them the radius
    expected = alpha / (2 * 3 ** 0.5) * (1 / 1.5)
    assert method.radius_rows.tolist() == pytest.approx([expected])
    set_grad(p, [[0.1, 0.2, 0.3, 0.4]])
    offsets = []
    real_hard_quantize = method.hard_quantize

    def record(values, out=None):
        offsets.append(values - method.latent_flat)  # eps v of the probe
        return real_hard_quantize(values, out=out)

    method.hard_quantize = record
    generator_state = method.generator.get_state()
    method.step(closure)
    # beta = 1 at QAT step 1 of 10 is 0.9 here; v = sqrt(beta) s g_hat + sqrt(1 - beta) u; the offsets are eps v
    torch.testing.assert_close(offsets[1], -offsets[0])  # the pair: w + eps v and w - eps v
    method.generator.set_state(generator_state)
    beta = method.current_beta
    sign = torch.randint(0, 2, (), generator=method.generator).float() * 2 - 1
    noise = (torch.rand(4, generator=method.generator) - 0.5) * (2 * 3 ** 0.5) * (1 - beta) ** 0.5
    g = torch.tensor([0.1, 0.2, 0.3, 0.4])
    v = noise + (beta ** 0.5) * sign * g / g.norm()
    torch.testing.assert_close(offsets[0], expected * v, rtol=1e-5, atol=1e-7)


def test_beta_decays_linearly_to_beta_min(make_method):
    method, _ = make_method("fogzo", [[0.1, 0.2]], total_steps=100, beta_min=0.9)
    assert method.beta(0) == 1.0 and method.beta(50) == pytest.approx(0.95) and method.beta(100) == pytest.approx(0.9)


def test_nspsa_is_fogzo_without_guidance(make_method):
    method, _ = make_method("nspsa", [[0.1, 0.2]], samples=4)
    assert method.beta(0) == 0.0 and method.config.samples == 4


def test_a_seeded_run_is_reproducible_and_the_seed_matters(idx_root, isolated_data_env):
    from qatbench.harness import execute
    from qatbench.spec import RunSpec, resolve

    def run(seed):
        spec = RunSpec(method="fogzo", task="mnist-mlp", bits=2, seed=seed, recipe="smoke",
                       method_args={"beta_min": "0.5", "samples": "2"})
        return execute(resolve(spec), data_root=idx_root, download=False, log=lambda line: None).history[0]["train_loss"]

    assert run(0) == run(0)
    assert run(0) != run(1)
