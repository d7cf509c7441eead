"""Training losses: one module per --loss recipe, one line each in LOSSES below (``--loss`` takes its keys, and
its help is their docstrings). A recipe subclasses base.SegmentationLoss and lists its (weight, term) pairs; the
terms are in base.py and terms.py. presence.py is --task presence's own loss."""
from __future__ import annotations

from giseg.models.tasks import get_task
from giseg.training.losses.base import DICE_ABSENT, SegmentationLoss
from giseg.training.losses.bce import Bce
from giseg.training.losses.bce_dice import BceDice
from giseg.training.losses.bce_dice_lovasz import BceDiceLovasz
from giseg.training.losses.dice import Dice
from giseg.training.losses.focal import Focal
from giseg.training.losses.lovasz import Lovasz
from giseg.training.losses.presence import PresenceLoss
from giseg.training.losses.terms import focal_loss, lovasz_hinge, tversky_loss
from giseg.training.losses.tversky import Tversky

LOSSES: dict[str, type[SegmentationLoss]] = {c.name: c for c in (
    BceDice,
    Bce,
    Dice,
    Focal,
    Tversky,
    Lovasz,
    BceDiceLovasz,
)}

__all__ = ["DICE_ABSENT", "LOSSES", "PresenceLoss", "SegmentationLoss", "focal_loss", "loss_help", "lovasz_hinge",
           "make_loss", "tversky_loss"]


def make_loss(name: str, task: str, classes: tuple[str, ...], priority: tuple[str, ...] | None = None,
              **options) -> SegmentationLoss | PresenceLoss:
    """The --loss recipe ``name`` for ``task`` (ValueError for a name not registered or a task it does not take);
    a task that does not segment (presence: a slice classifier) has its own loss."""
    if not get_task(task).segments:
        return PresenceLoss(len(classes))
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name](task, classes, priority, **options)


def loss_help() -> str:
    """--loss's help: every recipe with its docstring's first sentence."""
    return "; ".join(f"{name}: {' '.join(cls.__doc__.split())}" for name, cls in LOSSES.items())
