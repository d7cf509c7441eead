"""Training losses on logits already upsampled to the mask size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataset import multiclass_targets, unpack_targets


def soft_dice_loss(probs: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice, each class pooled over the batch. probs, targets: (B, C, H, W)."""
    dims = (0, 2, 3)
    inter = (probs * targets).sum(dims)
    denom = probs.sum(dims) + targets.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()


class SegmentationLoss:
    """multilabel: ``bce_weight`` * BCE + ``dice_weight`` * soft Dice on sigmoids (3 channels).
    multiclass: ``bce_weight`` * cross-entropy + ``dice_weight`` * soft Dice on the 3 organ softmax channels."""

    def __init__(self, task: str, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        self.task, self.bce_weight, self.dice_weight, self.smooth = task, bce_weight, dice_weight, smooth

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task == "multilabel":
            targets = unpack_targets(packed, logits.shape[1])
            ce = F.binary_cross_entropy_with_logits(logits, targets)
            dice = soft_dice_loss(torch.sigmoid(logits), targets, self.smooth)
        else:
            labels = multiclass_targets(packed)
            ce = F.cross_entropy(logits, labels)
            onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
            dice = soft_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:], self.smooth)
        return self.bce_weight * ce + self.dice_weight * dice


def upsample_like(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, K, h, w) logits to ``size`` (no-op when already there)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
