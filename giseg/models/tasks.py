"""The tasks a model is trained for (--task), each one object: its labels, its outputs, how its logits become
probabilities and masks, and what its evaluation reports. Code elsewhere asks the task (``get_task(name)``), never
compares task names: a new task is one entry here."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from giseg.utils.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str
    about: str  # one line for --help
    segments: bool  # per-pixel masks; False: whether each class shows on a slice (a slice classifier)
    background: bool  # softmax over a background channel + the classes, decoded by argmax; False: a sigmoid per
    # class, decoded by a threshold each (classes may overlap)

    @property
    def figure(self) -> str:
        """The per-class figure of its evaluation: Dice of the masks, or the AUC of a slice classifier."""
        return "dice" if self.segments else "auc"

    def labels(self, classes: tuple[str, ...]) -> dict[int, str]:
        """A model's id2label: the classes, with background first where the task has it."""
        return dict(enumerate(("background", *classes) if self.background else classes))

    def n_thresholds(self, classes: tuple[str, ...]) -> int:
        """How many decision thresholds its inference spec holds: one per class, none for argmax."""
        return 0 if self.background else len(classes)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K, ...) logits -> probabilities: softmax over background + classes, or a sigmoid per class."""
        return torch.softmax(logits, 1) if self.background else torch.sigmoid(logits)

    def class_channels(self, values):
        """(..., K, H, W) -> (..., C, H, W): the classes' channels (without the background), numpy or torch."""
        return values[..., 1:, :, :] if self.background else values

    def masks(self, values: torch.Tensor, thresholds: torch.Tensor | None, logits: bool) -> torch.Tensor:
        """(..., K, H, W) logits (``logits``) or probabilities -> (..., C, H, W) bool masks: value above the class's
        threshold (a sigmoid first for logits), or the argmax over background + classes (channel c is class c+1)."""
        if not self.background:
            p = torch.sigmoid(values) if logits else values
            return p > thresholds.to(p.device).view(-1, 1, 1)
        labels = values.argmax(-3, keepdim=True)
        return labels == torch.arange(1, values.shape[-3], device=values.device).view(-1, 1, 1)


MULTILABEL = Task("multilabel", "a sigmoid channel per class, classes may overlap", segments=True, background=False)
MULTICLASS = Task("multiclass", "softmax over background + classes, overlaps resolved by the dataset's priority (GI: "
                  "stomach > large_bowel > small_bowel)", segments=True, background=True)
PRESENCE = Task("presence", "a slice classifier (is each class on the slice), an image-classification --base_model, "
                "for giseg predict --gate_model", segments=False, background=False)
TASKS = {t.name: t for t in (MULTILABEL, MULTICLASS, PRESENCE)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"--task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def task_labels(task: str, classes: tuple[str, ...]) -> dict[int, str]:
    """A model's id2label for ``task`` (Task.labels)."""
    return get_task(task).labels(classes)
