"""--loss bce_dice_lovasz: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.models.tasks import MULTILABEL
from giseg.training.losses.base import Batch, SegmentationLoss


class BceDiceLovasz(SegmentationLoss):
    """BCE + soft Dice + --lovasz_weight x the Lovász hinge (the 2nd and 3rd place solutions' mix; multilabel)"""
    name = "bce_dice_lovasz"
    tasks = (MULTILABEL.name,)  # per class: a sigmoid channel each

    def terms(self, b: Batch) -> list:
        return [(self.pixel_weight, self.cross_entropy), (self.dice_weight, self.overlap),
                (self.lovasz_weight, self.lovasz)]
