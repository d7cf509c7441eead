"""--loss dice: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.training.losses.base import Batch, SegmentationLoss


class Dice(SegmentationLoss):
    """soft Dice only"""
    name = "dice"

    def terms(self, b: Batch) -> list:
        return [(self.dice_weight, self.overlap)]
