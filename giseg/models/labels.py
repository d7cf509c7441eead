"""A model's labels for a task: the classes (multilabel), or background + the classes (multiclass)."""
from __future__ import annotations

from giseg.utils.errors import UserError

TASKS = ("multilabel", "multiclass", "presence")  # presence: a slice classifier (models/classifier.py)


def task_labels(task: str, classes: tuple[str, ...]) -> dict[int, str]:
    """A model's id2label for ``task``: the classes (multilabel, presence), with background first for multiclass."""
    if task not in TASKS:
        raise UserError(f"--task must be one of {TASKS}, got {task!r}")
    return dict(enumerate(classes if task != "multiclass" else ("background", *classes)))
