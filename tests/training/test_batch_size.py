"""--auto_batch_size (issue #40): the search for the largest batch that fits, under a simulated memory limit; the
model's state left as it was; the learning-rate rules; a resume reuses the batch chosen at the start."""
import json

import pytest
import torch

from giseg.training import batch_size


class Limited(torch.nn.Module):
    """A model that runs out of memory above ``capacity`` images, as CUDA would (torch.OutOfMemoryError)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        if x.shape[0] > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.drop(self.norm(self.conv(x)))


def test_the_search_doubles_then_bisects_to_the_largest_batch_that_fits():
    found, tried = batch_size.largest_batch(lambda b: b <= 37, start=4, cap=1024)
    assert found == 37 and tried == [4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert batch_size.largest_batch(lambda b: True, 4, 100) == (100, [4, 8, 16, 32, 64, 100])
    assert batch_size.largest_batch(lambda b: b <= 2, 4, 100) == (0, [4])  # not even the start fits


def test_a_simulated_memory_limit_is_found_through_real_training_steps_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = Limited(capacity=21).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found, tried = batch_size.search(model, (3, 8, 8), torch.device("cpu"), _no_autocast, start=2, cap=512)
    assert found == 21 and tried[:5] == [2, 4, 8, 16, 32]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights (lr 0) and BatchNorm's running stats
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws did not move the run's random state
    assert all(p.grad is None for p in model.parameters())


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("rule, want", [("sqrt", 2e-3 * 2), ("linear", 2e-3 * 4), ("none", 2e-3)])
def test_the_learning_rate_follows_the_batch_by_its_rule(rule, want):
    assert batch_size.scaled_lr(2e-3, 32, 8, rule) == pytest.approx(want)


def test_a_resume_reuses_the_batch_chosen_at_the_start_and_a_cpu_keeps_the_given_one(tmp_path):
    from types import SimpleNamespace

    from giseg.training.config import TrainConfig

    cfg = TrainConfig(auto_batch_size=True, train_batch_size=8, lr=1e-3)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert batch_size.resolve(cfg, Limited(4), cpu, tmp_path, (3, 8, 8), 100) == (8, 1e-3)
    (tmp_path / batch_size.FILE).write_text(json.dumps({"batch": 48, "lr": 2.4e-3}))
    assert batch_size.resolve(cfg, Limited(4), cpu, tmp_path, (3, 8, 8), 100) == (48, 2.4e-3)
