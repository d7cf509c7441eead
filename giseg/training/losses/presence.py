"""--task presence's loss: the mean binary cross-entropy of (B, C) slice-classifier logits against whether each
class shows on the slice (data/masks.py presence_targets of the augmented masks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from giseg.data.masks import presence_targets


class PresenceLoss:
    def __init__(self, n_classes: int):
        self.n_classes = n_classes

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor, mix=None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), presence_targets(packed, self.n_classes))
