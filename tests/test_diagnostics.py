import pytest
import torch

from qatbench.diagnostics import TransitionMonitor
from qatbench.quant import hard_quantize, level_indices

LEVELS = torch.tensor([[-1.0, 1.0]])


class _Stub:
    """A method whose latent weights the test sets directly, measured against the levels +-1."""

    sharded = False

    def __init__(self):
        self.rows = torch.tensor([[-0.5, -0.2, 0.3, 0.9]])

    def level_indices(self):
        return level_indices(self.rows, LEVELS).to(torch.uint8).flatten()

    def distance_to_levels(self):
        return (self.rows - hard_quantize(self.rows, LEVELS)).abs().sum()


def test_rate_is_the_mean_fraction_of_weights_changing_level_over_sampled_step_pairs():
    method = _Stub()
    monitor = TransitionMonitor(method, period=2)
    for rows in ([[-0.5, -0.2, 0.3, 0.9]],  # step 0, kept: indices [0, 0, 1, 1]
                 [[-0.5, 0.2, 0.3, 0.9]],   # step 1: one of four changed
                 [[0.5, 0.2, 0.3, 0.9]],    # step 2, kept (the change from step 1 is not sampled)
                 [[0.5, -0.2, -0.3, 0.9]]):  # step 3: two of four changed
        method.rows = torch.tensor(rows)
        monitor.after_step()
    summary = monitor.epoch_summary()
    assert summary["transition_rate"] == pytest.approx((1 + 2) / (2 * 4)) and summary["transition_pairs"] == 2
    # distances to the nearest of +-1: 0.5, 0.8, 0.7, 0.1
    assert summary["distance_to_levels"] == pytest.approx((0.5 + 0.8 + 0.7 + 0.1) / 4)
    monitor.after_step()
    monitor.after_step()
    assert monitor.epoch_summary()["transition_rate"] == 0.0  # the count restarts each epoch


def test_no_levels_means_no_diagnostics():
    class Empty:
        def level_indices(self):
            return None

        def distance_to_levels(self):
            return None

    monitor = TransitionMonitor(Empty())
    monitor.after_step()
    assert monitor.epoch_summary() == {}
