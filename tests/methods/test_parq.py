import pytest
import torch

from qatbench.methods.parq import parq_prox
from qatbench.quant import hard_quantize
from tests.methods.conftest import set_grad

TWO_LEVELS = torch.tensor([[-1.0, 1.0]])
THREE_LEVELS = torch.tensor([[-1.0, 0.0, 1.0]])


def test_prox_by_hand_two_levels():
    w = torch.tensor([[0.2, 0.6, -0.3, -2.0, 3.0]])
    # interval [-1, 1], center 0, rho 0.5: p = clamp(w / 0.5, -1, 1); outside the range -> end level
    expected = torch.tensor([[0.4, 1.0, -0.6, -1.0, 1.0]])
    torch.testing.assert_close(parq_prox(w, TWO_LEVELS, 0.5), expected)


def test_prox_by_hand_three_levels():
    w = torch.tensor([[0.3, 0.9, -0.45, 0.0]])
    # 0.3 in [0, 1]: 0.5 + (0.3 - 0.5) / 0.5 = 0.1; 0.9 -> 1.3 -> 1; -0.45 in [-1, 0]: -0.5 + 0.05 / 0.5 = -0.4
    expected = torch.tensor([[0.1, 1.0, -0.4, 0.0]])
    torch.testing.assert_close(parq_prox(w, THREE_LEVELS, 0.5), expected)


def test_inverse_slope_one_is_identity_inside_the_range():
    w = torch.tensor([[-0.99, -0.5, 0.0, 0.25, 0.99]])
    torch.testing.assert_close(parq_prox(w, THREE_LEVELS, 1.0), w)
    torch.testing.assert_close(parq_prox(torch.tensor([[1.5, -7.0]]), THREE_LEVELS, 1.0), torch.tensor([[1.0, -1.0]]))


def test_inverse_slope_zero_is_hard_quantization():
    w = torch.randn(5, 40)
    levels = torch.sort(torch.randn(5, 4), dim=1).values
    torch.testing.assert_close(parq_prox(w, levels, 0.0), hard_quantize(w, levels))


def test_tiny_inverse_slope_matches_hard_quantization_off_midpoints():
    w = torch.tensor([[0.3, 0.9, -0.45, -0.7]])
    torch.testing.assert_close(parq_prox(w, THREE_LEVELS, 1e-9), hard_quantize(w, THREE_LEVELS))


def test_inverse_slope_schedule_end_points(make_method):
    method, _ = make_method("parq", [[0.1, 0.2]], anneal_start=10, anneal_end=110, steepness=10)
    assert method.inverse_slope(0) == 1.0
    assert method.inverse_slope(10) == pytest.approx(1.0)
    assert method.inverse_slope(60) == pytest.approx(0.5)
    assert method.inverse_slope(109) < 0.01
    assert method.inverse_slope(110) == 0.0


def test_aprox_inverse_slope_is_one_over_cumulative_lr(make_method):
    method, p = make_method("parq", [[0.3, -0.7]], lr=0.4, slope_schedule="aprox")
    for _ in range(5):
        set_grad(p, [[0.0, 0.0]])
        method.step()
    assert method.gamma == pytest.approx(2.0)  # max(1, 5 * 0.4)
    assert method.inverse_slope(5) == pytest.approx(0.5)


def test_quant_shrink_quantizes_w_over_gamma(make_method):
    method, p = make_method("parq", [[0.3, -0.7]], lr=1.0, quant_shrink=True, anneal_end=2)
    for _ in range(4):
        set_grad(p, [[0.0, 0.0]])
        method.step()
    assert method.gamma == pytest.approx(4.0)
    torch.testing.assert_close(method.latent[0], torch.tensor([[0.3, -0.7]]))
    torch.testing.assert_close(p.data, hard_quantize(torch.tensor([[0.3, -0.7]]) / 4.0, method.levels[0]))


def test_after_anneal_end_the_model_is_exactly_quantized(make_method):
    method, p = make_method("parq", torch.randn(6, 10).tolist(), bits=2, granularity="channel",
                            total_steps=20, anneal_end=0.5)
    for _ in range(12):
        p.grad = torch.randn_like(p) * 0.01
        method.step()
    assert all(len(row.unique()) <= 4 for row in p.data)
    assert method.diagnostics()["inv_slope"] == 0.0


@pytest.mark.parametrize("rho", [0.7, 0.3, 0.05])
def test_closed_form_for_evenly_spaced_levels_matches_the_general_prox(rho):
    torch.manual_seed(0)
    w = 2 * torch.randn(6, 50)
    levels = torch.linspace(-1.5, 1.5, 4)[None] * torch.rand(6, 1).add(0.5)
    torch.testing.assert_close(parq_prox(w, levels, rho, evenly_spaced=True), parq_prox(w, levels, rho))


def test_before_anneal_start_no_map_is_applied_not_even_a_clamp(make_method):
    # the PARQ reference leaves p = w until annealing starts; levels from w: 2 bits, q_max = min(2 * 1.5, 3) = 3
    w = [[-3.0, 0.2, 0.5, 2.5]]
    method, p = make_method("parq", w, lr=0.1, anneal_start=5, anneal_end=10)
    for _ in range(5):  # steps t = 0..4, all before anneal_start
        set_grad(p, [[0.0, 0.0, 0.0, 0.0]])
        method.step()
        assert torch.equal(p.data, torch.tensor(w))  # -3.0 and 2.5 lie outside [q_1, q_m] = [-3, 3]... and stay
    set_grad(p, [[0.0, 0.0, 0.0, 0.0]])
    method.step()  # t = 5: rho = 1 exactly, the affine map (exact on these values): the identity inside [q_1, q_m]
    assert torch.equal(p.data, torch.tensor(w))
    assert method.inverse_slope(5) == 1.0 and method.inverse_slope(4) == 1.0


def test_the_annealed_map_after_anneal_start_by_hand(make_method):
    method, p = make_method("parq", [[-3.0, 0.2, 0.5, 2.5]], lr=0.1, anneal_start=2, anneal_end=4, steepness=10)
    for _ in range(4):  # t = 0..3; the last map is at t = 3
        set_grad(p, [[0.0, 0.0, 0.0, 0.0]])
        method.step()
    rho = method.inverse_slope(3)  # f = 1/2: the mirror sigmoid's midpoint, rho = 1/2 exactly
    assert rho == pytest.approx(0.5)
    # levels {-3, -1, 1, 3}: 0.2 in [-1, 1] (centre 0) -> 0.4; 0.5 -> 1.0 (clamped); 2.5 in [1, 3] (centre 2) -> 3.0
    torch.testing.assert_close(p.data, torch.tensor([[-3.0, 0.4, 1.0, 3.0]]))


@pytest.mark.parametrize("steepness", [1.0, 10.0, 100.0])
def test_centre_one_half_is_the_references_curve(make_method, steepness):
    import math

    method, _ = make_method("parq", [[0.1, 0.2]], anneal_start=100, anneal_end=300, steepness=steepness)
    for t in (100, 137, 200, 251, 299):
        ft = (t - 100) / 200  # the reference's normalized_mirror_sigmoid, written out
        st = 1 / (1 + math.exp(steepness * (ft - 0.5)))
        s1, s2 = 1 / (1 + math.exp(-0.5 * steepness)), 1 / (1 + math.exp(0.5 * steepness))
        assert method.inverse_slope(t) == pytest.approx((st - s2) / (s1 - s2), rel=1e-12)


def test_another_centre_moves_the_steepest_point_and_keeps_the_end_values(make_method):
    method, _ = make_method("parq", [[0.1, 0.2]], anneal_start=0, anneal_end=100, steepness=10, center=0.25)
    assert method.inverse_slope(0) == pytest.approx(1.0) and method.inverse_slope(99) < 0.01
    drops = [method.inverse_slope(t) - method.inverse_slope(t + 1) for t in range(99)]
    assert drops.index(max(drops)) in (24, 25)  # steepest at a quarter of the interval


def test_the_flat_fast_path_computes_the_per_tensor_rule(make_method):
    torch.manual_seed(0)
    for scheme_bits, granularity in ((2, "channel"), (4, "tensor"), (0, "channel")):
        method, p = make_method("parq", (torch.randn(5, 12) * 2).tolist(), bits=scheme_bits, granularity=granularity,
                                anneal_end=0.5)
        set_grad(p, torch.zeros(5, 12).tolist())
        method.step()
        for t in (3, 20, 40, 49):
            out = torch.empty_like(method.latent_flat)
            method.prox_flat(method.latent_flat, t, out)
            expected = method.prox(method.latent[0].view(method.levels[0].shape[0], -1), method.levels[0], t)
            torch.testing.assert_close(out.view_as(expected), expected, rtol=1e-5, atol=1e-6)  # rounding only


def test_no_annealing_is_ste_exactly_from_the_first_step(make_method):
    """anneal_end = anneal_start: rho = 0 from the first step, the slope driven to infinity: STE, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(8, 30, generator=generator) * 0.1).tolist()
    parq, p = make_method("parq", weight, lr=0.05, granularity="channel", anneal_start=0, anneal_end=0)
    ste, q = make_method("ste", weight, lr=0.05, granularity="channel")
    assert parq.inverse_slope(0) == 0.0
    for _ in range(60):
        noise = torch.randn(8, 30, generator=generator) * 0.05
        for method, param in ((parq, p), (ste, q)):
            param.grad = param.detach() * 0.5 + noise
            method.step()
            method.zero_grad()
        assert torch.equal(p.data, q.data)
