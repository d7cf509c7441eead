"""Training losses on logits already upsampled to the mask size.

``--loss`` picks the recipe; ``--pixel_loss_weight`` (alias ``--bce_weight``) weights its per-pixel term (BCE,
cross-entropy or focal) and ``--dice_weight`` its overlap term (soft Dice or Tversky):
  bce_dice  BCE (multilabel) / cross-entropy (multiclass) + soft Dice   (default; the brain-MRI projects' choice)
  bce       BCE / cross-entropy only
  dice      soft Dice only
  focal     focal loss (--focal_gamma) + soft Dice
  tversky   BCE / cross-entropy + Tversky loss (--tversky_alpha weighs false positives, --tversky_beta false
            negatives; alpha = beta = 0.5 is the soft Dice)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from masks import multiclass_targets, unpack_targets

LOSSES = ("bce_dice", "bce", "dice", "focal", "tversky")


def tversky_loss(probs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of TP / (TP + alpha FP + beta FN), soft, pooled over the batch."""
    dims = (0, 2, 3)
    tp = (probs * targets).sum(dims)
    fp = (probs * (1 - targets)).sum(dims)
    fn = ((1 - probs) * targets).sum(dims)
    return 1.0 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, multiclass: bool = False) -> torch.Tensor:
    """Focal loss: cross-entropy down-weighted by (1 - p_true)^gamma on easy pixels."""
    if multiclass:
        logp = F.log_softmax(logits, 1).gather(1, targets.unsqueeze(1)).squeeze(1)
        return (-(1 - logp.exp()) ** gamma * logp).mean()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return ((1 - p_true) ** gamma * bce).mean()


class SegmentationLoss:
    """``pixel_weight`` * (BCE, CE or focal) + ``dice_weight`` * (soft Dice or Tversky), by ``loss``; multilabel
    on one sigmoid channel per class, multiclass on softmax over background + classes (the overlap term on the
    class channels; overlapping classes resolved by ``priority``, the dataset adapter's)."""

    def __init__(self, task: str, classes: tuple[str, ...], priority: tuple[str, ...] | None = None,
                 pixel_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0, loss: str = "bce_dice",
                 focal_gamma: float = 2.0, tversky_alpha: float = 0.3, tversky_beta: float = 0.7):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.task, self.smooth, self.loss = task, smooth, loss
        self.focal_gamma, self.alpha, self.beta = focal_gamma, tversky_alpha, tversky_beta
        self.classes, self.priority = tuple(classes), tuple(priority or classes)
        self.pixel_weight = 0.0 if loss == "dice" else pixel_weight
        self.dice_weight = 0.0 if loss == "bce" else dice_weight

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        multiclass = self.task == "multiclass"
        if multiclass:
            labels = multiclass_targets(packed, self.classes, self.priority)
            targets = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
            probs = torch.softmax(logits, 1)[:, 1:]
        else:
            labels = targets = unpack_targets(packed, logits.shape[1])
            probs = torch.sigmoid(logits)
        total = logits.new_zeros(())
        if self.pixel_weight:
            if self.loss == "focal":
                pixel = focal_loss(logits, labels, self.focal_gamma, multiclass)
            elif multiclass:
                pixel = F.cross_entropy(logits, labels)
            else:
                pixel = F.binary_cross_entropy_with_logits(logits, targets)
            total = total + self.pixel_weight * pixel
        if self.dice_weight:
            alpha, beta = (self.alpha, self.beta) if self.loss == "tversky" else (0.5, 0.5)
            total = total + self.dice_weight * tversky_loss(probs, targets, alpha, beta, self.smooth)
        return total


def upsample_like(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, K, h, w) logits to ``size`` (no-op when already there)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
