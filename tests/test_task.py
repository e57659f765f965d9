import pytest
import torch

from qatbench.batches import TensorBatches
from qatbench.task import Recipe


def test_cosine_ends_at_min_lr_and_holds_it():
    recipe = Recipe(epochs=10, batch_size=1, lr=1.0, min_lr=0.01, final_hold_epochs=2)
    assert recipe.lr_factor(0, 10) == pytest.approx(1.0)
    assert recipe.lr_factor(40, 10) == pytest.approx(0.505)  # halfway through the 80 decay steps
    assert recipe.lr_factor(80, 10) == pytest.approx(0.01)
    assert recipe.lr_factor(99, 10) == pytest.approx(0.01)


def test_linear_warmup_then_cosine():
    recipe = Recipe(epochs=10, batch_size=1, lr=1.0, warmup_epochs=1)
    assert [recipe.lr_factor(s, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert recipe.lr_factor(4, 4) == pytest.approx(1.0)


def test_step_schedule_divides_at_each_milestone():
    recipe = Recipe(epochs=200, batch_size=1, lr=0.1, lr_schedule="step", milestones=(80, 120, 150))
    factors = [recipe.lr_factor(epoch * 10, 10) for epoch in (0, 79, 80, 120, 150, 199)]
    assert factors == pytest.approx([1, 1, 0.1, 0.01, 0.001, 0.001])


def test_overrides_change_only_what_is_given():
    recipe = Recipe(epochs=10, batch_size=32, lr=0.1)
    assert recipe.with_overrides(3, None, None) == Recipe(epochs=3, batch_size=32, lr=0.1)


def test_tensor_batches_cover_the_data_once_per_pass_and_apply_the_transform():
    data = torch.arange(10)
    batches = TensorBatches(data, data, 3, shuffle=True, generator=torch.Generator().manual_seed(0),
                            transform=lambda x, y: (x * 2, y))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10)) and len(batches) == 4
    assert all(torch.equal(x, 2 * y) for x, y in batches)
    assert len(TensorBatches(data, data, 3, shuffle=False, drop_last=True)) == 3
