"""--loss bce: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.training.losses.base import Batch, SegmentationLoss


class Bce(SegmentationLoss):
    """BCE / cross-entropy only"""
    name = "bce"

    def terms(self, b: Batch) -> list:
        return [(self.pixel_weight, self.cross_entropy)]
