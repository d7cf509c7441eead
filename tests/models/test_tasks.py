"""Every task (giseg/models/tasks.py) keeps its own contract: labels, thresholds, probabilities and masks agree."""
import pytest
import torch

from giseg.models.tasks import TASKS, get_task
from giseg.utils.errors import UserError

CLASSES = ("large_bowel", "small_bowel", "stomach")


@pytest.mark.parametrize("name", TASKS)
def test_a_tasks_outputs_decode_to_the_class_each_pixel_was_made_to_show(name):
    task = TASKS[name]
    labels = task.labels(CLASSES)
    assert list(labels.values())[-3:] == list(CLASSES) and len(labels) == 3 + task.background
    assert task.n_thresholds(CLASSES) == (0 if task.background else 3)
    logits = torch.full((1, len(labels), 2, 3), -8.0)
    for k in range(3):  # pixel (0, k) shows class k (channel k + 1 behind a background)
        logits[0, k + task.background, 0, k] = 8.0
    if task.background:
        logits[0, 0, 1] = 8.0  # the second row is background
    thresholds = torch.full((3,), 0.5)
    want = torch.zeros(1, 3, 2, 3, dtype=torch.bool)
    for k in range(3):
        want[0, k, 0, k] = True
    probs = task.probabilities(logits)
    assert torch.equal(task.masks(logits, thresholds, logits=True), want)
    assert torch.equal(task.masks(probs, thresholds, logits=False), want)
    assert task.class_channels(probs).shape == (1, 3, 2, 3)
    assert task.figure == ("dice" if task.segments else "auc")


def test_an_unknown_task_is_one_line_naming_the_flag():
    with pytest.raises(UserError, match="--task must be one of"):
        get_task("semantic")
