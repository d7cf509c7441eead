"""--loss tversky: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.training.losses.base import Batch, SegmentationLoss


class Tversky(SegmentationLoss):
    """BCE / cross-entropy + the Tversky loss (--tversky_alpha weighs false positives, --tversky_beta false negatives;
    alpha = beta = 0.5 is the soft Dice)"""
    name = "tversky"

    def terms(self, b: Batch) -> list:
        return [(self.pixel_weight, self.cross_entropy),
                (self.dice_weight, lambda b: self.overlap(b, self.alpha, self.beta))]
