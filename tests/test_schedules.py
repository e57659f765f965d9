import pytest

from qatbench.errors import QatbenchError
from qatbench.schedules import linear_ramp, normalized_mirror_sigmoid, resolve_point


def test_points_up_to_one_are_fractions_and_above_are_steps():
    assert resolve_point(0.75, 1000) == 750
    assert resolve_point(1.0, 1000) == 1000
    assert resolve_point(0, 1000) == 0
    assert resolve_point(1500, 1000) == 1500


@pytest.mark.parametrize("value", [-0.1, 2.5])
def test_bad_points_are_rejected(value):
    with pytest.raises(QatbenchError, match="anneal_end"):
        resolve_point(value, 100, "anneal_end")


def test_linear_ramp_end_points():
    assert linear_ramp(0, 10, 20) == 0.0
    assert linear_ramp(10, 10, 20) == 0.0
    assert linear_ramp(15, 10, 20) == 0.5
    assert linear_ramp(20, 10, 20) == 1.0
    assert linear_ramp(99, 10, 20) == 1.0


def test_mirror_sigmoid_end_points_and_symmetry():
    assert normalized_mirror_sigmoid(0.0, 10, 0.5) == pytest.approx(1.0)
    assert normalized_mirror_sigmoid(1.0, 10, 0.5) == pytest.approx(0.0)
    assert normalized_mirror_sigmoid(0.5, 10, 0.5) == pytest.approx(0.5)
    assert normalized_mirror_sigmoid(0.2, 10, 0.5) + normalized_mirror_sigmoid(0.8, 10, 0.5) == pytest.approx(1.0)
