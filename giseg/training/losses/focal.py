"""--loss focal: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.training.losses.base import Batch, SegmentationLoss


class Focal(SegmentationLoss):
    """focal loss (--focal_gamma) + soft Dice"""
    name = "focal"

    def terms(self, b: Batch) -> list:
        return [(self.pixel_weight, self.focal), (self.dice_weight, self.overlap)]
