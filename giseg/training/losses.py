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

from giseg.data.masks import multiclass_targets, unpack_targets, valid_pixels

LOSSES = ("bce_dice", "bce", "dice", "focal", "tversky")
DICE_ABSENT = ("count", "skip")  # --dice_absent: a class absent from the whole batch counts in the overlap term, or not


def tversky_loss(probs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = 1.0, absent: str = "count") -> torch.Tensor:
    """1 - mean over classes of TP / (TP + alpha FP + beta FN), soft, pooled over the batch. ``absent`` "count":
    a class with no pixel in the batch scores (smooth) / (alpha FP + smooth), so any prediction of it costs and
    predicting nothing scores best; "skip": such classes are left out of the mean (segmentation_models_pytorch's
    DiceLoss does so), and a batch with no class at all adds nothing."""
    dims = (0, 2, 3)
    tp = (probs * targets).sum(dims)
    fp = (probs * (1 - targets)).sum(dims)
    fn = ((1 - probs) * targets).sum(dims)
    score = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    if absent == "skip":
        present = targets.sum(dims) > 0
        return ((1.0 - score) * present).sum() / present.sum().clamp_min(1)
    return 1.0 - score.mean()


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, K, H, W) or (B, H, W) ``values`` over the pixels where (B, 1, H, W) ``valid`` is True (all
    when None; the plain mean when every pixel is valid)."""
    if valid is None:
        return values.mean()
    if values.dim() == 3:
        valid = valid[:, 0]
    per_pixel = values.shape[1] if values.dim() == 4 else 1
    return (values * valid).sum() / (valid.sum() * per_pixel).clamp_min(1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, multiclass: bool = False,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss: cross-entropy down-weighted by (1 - p_true)^gamma on easy pixels (those ``valid`` only)."""
    if multiclass:
        logp = F.log_softmax(logits, 1).gather(1, targets.unsqueeze(1)).squeeze(1)
        return _masked_mean(-(1 - logp.exp()) ** gamma * logp, valid)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return _masked_mean((1 - p_true) ** gamma * bce, valid)


class SegmentationLoss:
    """``pixel_weight`` * (BCE, CE or focal) + ``dice_weight`` * (soft Dice or Tversky), by ``loss``; multilabel
    on one sigmoid channel per class, multiclass on softmax over background + classes (the overlap term on the
    class channels; overlapping classes resolved by ``priority``, the dataset adapter's)."""

    def __init__(self, task: str, classes: tuple[str, ...], priority: tuple[str, ...] | None = None,
                 pixel_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0, loss: str = "bce_dice",
                 focal_gamma: float = 2.0, tversky_alpha: float = 0.3, tversky_beta: float = 0.7,
                 unlabelled: bool = False, dice_absent: str = "count"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if dice_absent not in DICE_ABSENT:
            raise ValueError(f"dice_absent must be one of {DICE_ABSENT}, got {dice_absent!r}")
        self.task, self.smooth, self.loss, self.dice_absent = task, smooth, loss, dice_absent
        self.unlabelled = unlabelled  # masks may carry the ignore bit (the adapter's may_have_unlabelled)
        self.focal_gamma, self.alpha, self.beta = focal_gamma, tversky_alpha, tversky_beta
        self.classes, self.priority = tuple(classes), tuple(priority or classes)
        self.pixel_weight = 0.0 if loss == "dice" else pixel_weight
        self.dice_weight = 0.0 if loss == "bce" else dice_weight

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The loss of (B, K, H, W) ``logits`` against (B, H, W) ``packed`` masks. With ``unlabelled``, pixels
        whose ignore bit is set (unlabelled in the ground truth) count in no term; without it the masks have no
        such pixels and the plain means are taken (the same numbers, bit for bit, as before the ignore bit)."""
        logits = logits.float()
        multiclass = self.task == "multiclass"
        valid = valid_pixels(packed) if self.unlabelled else None
        if multiclass:
            labels = multiclass_targets(packed, self.classes, self.priority)
            targets = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
            probs = torch.softmax(logits, 1)[:, 1:]
        else:
            labels = targets = unpack_targets(packed, logits.shape[1])
            probs = torch.sigmoid(logits)
        if valid is not None:
            probs = probs * valid
        total = logits.new_zeros(())
        if self.pixel_weight:
            if self.loss == "focal":
                pixel = focal_loss(logits, labels, self.focal_gamma, multiclass, valid)
            elif multiclass:
                pixel = F.cross_entropy(logits, labels if valid is None else labels.masked_fill(~valid[:, 0], -100))
            elif valid is None:
                pixel = F.binary_cross_entropy_with_logits(logits, targets)
            else:
                pixel = _masked_mean(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), valid)
            total = total + self.pixel_weight * pixel
        if self.dice_weight:
            alpha, beta = (self.alpha, self.beta) if self.loss == "tversky" else (0.5, 0.5)
            total = total + self.dice_weight * tversky_loss(probs, targets, alpha, beta, self.smooth, self.dice_absent)
        return total
