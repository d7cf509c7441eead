"""--loss lovasz: one recipe of the registry in __init__.py."""
from __future__ import annotations

from giseg.models.tasks import MULTILABEL
from giseg.training.losses.base import Batch, SegmentationLoss


class Lovasz(SegmentationLoss):
    """the Lovász hinge only: a convex surrogate of the IoU, per image and class (multilabel)"""
    name = "lovasz"
    tasks = (MULTILABEL.name,)  # per class: a sigmoid channel each

    def terms(self, b: Batch) -> list:
        return [(self.lovasz_weight, self.lovasz)]
