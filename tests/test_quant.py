import pytest
import torch

from qatbench.errors import QatbenchError
from qatbench.quant import (
    TERNARY, QuantizerConfig, as_rows, bits_label, check_exact, distinct_per_row, estimate_levels, grid,
    grid_coefficients, hard_quantize, level_indices, num_levels, parse_bits,
)


def uniform_levels(rows, bits):
    return estimate_levels(rows, QuantizerConfig(bits))


def lsbq_levels(rows, bits):
    return estimate_levels(rows, QuantizerConfig(bits, "lsbq"))

W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])  # mean|w| = 2.5, max|w| = 4


@pytest.mark.parametrize("text, bits", [("1", 1), ("2", 2), ("8", 8), ("T", TERNARY), ("ternary", TERNARY)])
def test_parse_bits_accepts_1_to_8_and_ternary(text, bits):
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["0", "9", "-1", "two", "", "2.5"])
def test_parse_bits_rejects_with_valid_choices(text):
    with pytest.raises(QatbenchError, match=r"valid choices: 1\.\.8 or T"):
        parse_bits(text)


def test_bits_labels_and_level_counts():
    assert [bits_label(b) for b in (1, TERNARY, 4, None)] == ["1", "T", "4", "FP"]
    assert [num_levels(b) for b in (1, 2, TERNARY, 4)] == [2, 4, 3, 16]


def test_uniform_one_bit_is_plus_minus_qmax():
    # q_max = min(1 * 2.5, 4) = 2.5
    torch.testing.assert_close(uniform_levels(W, 1), torch.tensor([[-2.5, 2.5]]))


def test_uniform_two_bits_mean_scale():
    # q_max = min(2 * 2.5, 4) = 4, s = 4 / 1.5
    s = 4 / 1.5
    torch.testing.assert_close(uniform_levels(W, 2), torch.tensor([[-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s]]))


def test_uniform_four_bits_is_capped_by_the_largest_weight():
    s = 4 / 7.5  # q_max = min(4 * mean|w|, max|w|) = min(10, 4)
    expected = (torch.arange(16.0) - 7.5) * s
    torch.testing.assert_close(uniform_levels(W, 4), expected[None])


def test_uniform_ternary():
    s = 4 / 1.5
    torch.testing.assert_close(uniform_levels(W, TERNARY), torch.tensor([[-s, 0.0, s]]))


def test_lsbq_two_bits_greedy_residual():
    # v1 = 2.5; residual [-1.5, 0.5, 0.5, -1.5]; v2 = 1.0; levels +-2.5 +-1
    torch.testing.assert_close(lsbq_levels(W, 2), torch.tensor([[-3.5, -1.5, 1.5, 3.5]]))


def test_lsbq_ternary():
    torch.testing.assert_close(lsbq_levels(W, TERNARY), torch.tensor([[-2.75, 0.0, 2.75]]))


def test_per_channel_levels_differ_by_row():
    weight = torch.tensor([[1.0, -1.0], [10.0, -10.0]])
    levels = estimate_levels(as_rows(weight, "channel"), QuantizerConfig(bits=1, granularity="channel"))
    torch.testing.assert_close(levels, torch.tensor([[-1.0, 1.0], [-10.0, 10.0]]))
    assert estimate_levels(as_rows(weight, "tensor"), QuantizerConfig(bits=1)).shape == (1, 2)


def test_as_rows_flattens_conv_weights_per_output_channel():
    conv = torch.zeros(8, 3, 3, 3)
    assert as_rows(conv, "channel").shape == (8, 27)
    assert as_rows(conv, "tensor").shape == (1, 216)


def test_hard_quantize_takes_nearest_level_and_ties_go_down():
    levels = torch.tensor([[-2.0, -1.0, 1.0, 2.0]])
    w = torch.tensor([[0.1, -3.0, 100.0, -0.5, 0.0, 1.5]])
    torch.testing.assert_close(hard_quantize(w, levels), torch.tensor([[1.0, -2.0, 2.0, -1.0, -1.0, 1.0]]))
    assert level_indices(w, levels).tolist() == [[2, 0, 3, 1, 1, 2]]


def test_distinct_per_row():
    rows = torch.tensor([[1.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert distinct_per_row(rows).tolist() == [2, 3]


def test_exactness_passes_on_quantized_and_catches_one_extra_value():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0]]).repeat(4, 1)  # both signs in every row
    rows = as_rows(weight, "channel")
    quantized = hard_quantize(rows, estimate_levels(rows, QuantizerConfig(bits=1))).view(4, 6)
    assert check_exact("w", quantized, "channel", 1).ok
    broken = quantized.clone()
    broken[2, 3] = 0.123
    result = check_exact("w", broken, "channel", 1)
    assert not result.ok and result.distinct == 3 and result.allowed == 2


def test_exactness_is_per_row_when_per_channel():
    weight = torch.tensor([[1.0, -1.0, 1.0], [5.0, -5.0, 5.0]])  # 2 values per row, 4 in the tensor
    assert check_exact("w", weight, "channel", 1).ok
    assert not check_exact("w", weight, "tensor", 1).ok


@pytest.mark.parametrize("scheme", ["uniform", "lsbq"])
@pytest.mark.parametrize("bits", [1, 2, TERNARY, 4])
def test_hard_quantized_tensor_is_exact_for_every_scheme(scheme, bits):
    weight = torch.randn(16, 32)
    config = QuantizerConfig(bits=bits, scheme=scheme)
    rows = as_rows(weight, "channel")
    quantized = hard_quantize(rows, estimate_levels(rows, config))
    assert check_exact("w", quantized, "channel", bits).ok


def test_quantizer_config_rejects_bad_bits():
    with pytest.raises(QatbenchError, match="invalid bits 9"):
        QuantizerConfig(bits=9)


def test_rows_of_a_channels_last_weight_are_views_of_whole_output_channels():
    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    rows = as_rows(weight, "channel")
    assert rows.shape == (8, 27) and rows.data_ptr() == weight.data_ptr()
    rows[2].fill_(7.0)
    assert (weight[2] == 7.0).all() and (weight[3] != 7.0).any()


@pytest.mark.parametrize("bits", [1, 2, TERNARY, 4])
def test_closed_form_rounding_agrees_with_the_binary_search_on_uniform_levels(bits):
    torch.manual_seed(0)
    rows = torch.randn(32, 100)
    levels = uniform_levels(rows, bits)
    indices = level_indices(rows, levels)
    assert torch.equal(level_indices(rows, levels, evenly_spaced=True), indices)
    torch.testing.assert_close(hard_quantize(rows, levels, evenly_spaced=True), levels.gather(1, indices))


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fast_hard_quantization_is_bitwise_an_entry_of_the_level_table(bits, granularity):
    torch.manual_seed(bits)
    rows = as_rows(torch.randn(16, 3, 3, 3) * torch.logspace(-3, 2, 16)[:, None, None, None], granularity)
    levels = estimate_levels(rows, QuantizerConfig(bits=bits, granularity=granularity))
    fast = hard_quantize(rows, levels, evenly_spaced=True)
    index = level_indices(rows, levels, evenly_spaced=True)
    assert torch.equal(fast, levels.gather(1, index))  # bit for bit, not within a tolerance
    first, step = grid(levels)
    assert torch.equal(levels, grid_coefficients(levels.shape[1], levels.dtype) * step)


def test_a_zero_row_has_a_normal_step_and_distinct_levels():
    levels = estimate_levels(torch.zeros(1, 8), QuantizerConfig(bits=2))
    assert len(levels.unique()) == 4 and torch.equal(grid(levels)[1] / 2 * 2, grid(levels)[1])


TIE_LEVELS = torch.tensor([[-1.5, -0.5, 0.5, 1.5]])  # uniform, step 1


@pytest.mark.parametrize("evenly_spaced", [True, False], ids=["closed-form", "searched"])
def test_every_rounding_path_sends_a_tie_to_the_lower_level(evenly_spaced):
    weights = torch.tensor([[0.0, 1.0, -1.0, 0.2, -7.0]])  # three midpoints, then a plain weight and one below
    assert hard_quantize(weights, TIE_LEVELS, evenly_spaced=evenly_spaced).tolist() == [[-0.5, 0.5, -1.5, 0.5, -1.5]]
    assert level_indices(weights, TIE_LEVELS, evenly_spaced=evenly_spaced).tolist() == [[1, 2, 0, 2, 0]]


@pytest.mark.parametrize("bits, scheme", [(1, "uniform"), (2, "uniform"), (3, "uniform"), (TERNARY, "uniform"),
                                          (2, "lsbq"), (3, "lsbq"), (TERNARY, "lsbq")])
def test_ties_go_down_on_every_path_the_runs_take(bits, scheme):
    """Weights exactly on the midpoints of their row's levels: the shared quantizer over a layout (what every
    method's flat step, the transition monitor, fp and rtn use) and the per-tensor hook pick the lower level."""
    from qatbench.flat import FlatLayout
    from qatbench.quant import Quantizer, levels_of_table

    config = QuantizerConfig(bits, scheme, "channel")
    rows = torch.randn(3, 64, generator=torch.Generator().manual_seed(bits)) * torch.tensor([[1.0], [0.25], [4.0]])
    levels = estimate_levels(rows, config)
    midpoints = (levels[:, 1:] + levels[:, :-1]) / 2
    if scheme == "uniform":  # the closed form's ties: u = w / s exactly halfway between two coefficients
        first, step = grid(levels)
        midpoints = (grid_coefficients(levels.shape[1], levels.dtype)[:-1] + 0.5) * step
    ties = midpoints.repeat(1, 2)
    expected = levels[:, :-1].repeat(1, 2)
    quantizer = Quantizer(config, FlatLayout([ties], "channel"))
    flat_levels = levels_of_table(levels, config.evenly_spaced, quantizer.layout)
    assert torch.equal(quantizer.hard_quantize(ties.reshape(-1), flat_levels).view_as(ties), expected)
    assert torch.equal(quantizer.indices(ties.reshape(-1), flat_levels).long().view_as(ties),
                       torch.arange(levels.shape[1] - 1).repeat(3, 2))
    assert torch.equal(hard_quantize(ties, levels, evenly_spaced=config.evenly_spaced), expected)
