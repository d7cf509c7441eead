"""--loss bce_dice: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.training.losses.base import Batch, SegmentationLoss


class BceDice(SegmentationLoss):
    """BCE (multilabel) / cross-entropy (multiclass) + soft Dice (the default; the brain-MRI projects' choice)"""
    name = "bce_dice"

    def terms(self, b: Batch) -> list:
        return [(self.pixel_weight, self.cross_entropy), (self.dice_weight, self.overlap)]
