"""Training losses on logits already upsampled to the mask size.

``--loss`` picks the recipe; ``--pixel_loss_weight`` (alias ``--bce_weight``) weights its per-pixel term (BCE,
cross-entropy or focal) and ``--dice_weight`` its overlap term (soft Dice or Tversky):
  bce_dice  BCE (multilabel) / cross-entropy (multiclass) + soft Dice   (default; the brain-MRI projects' choice)
  bce       BCE / cross-entropy only
  dice      soft Dice only
  focal     focal loss (--focal_gamma) + soft Dice
  tversky   BCE / cross-entropy + Tversky loss (--tversky_alpha weighs false positives, --tversky_beta false
            negatives; alpha = beta = 0.5 is the soft Dice)
  lovasz    the Lovász hinge only (multilabel): a convex surrogate of the IoU, per image and class
  bce_dice_lovasz  BCE + soft Dice + --lovasz_weight x the Lovász hinge (the 2nd and 3rd place solutions' mix)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from giseg.data.masks import multiclass_targets, presence_targets, unpack_targets, valid_pixels

LOSSES = ("bce_dice", "bce", "dice", "focal", "tversky", "lovasz", "bce_dice_lovasz")
LOVASZ = ("lovasz", "bce_dice_lovasz")  # the recipes with a Lovász term (multilabel only)
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


def lovasz_hinge(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The Lovász hinge (Berman et al. 2018) of (B, C, H, W) ``logits`` against 0/1 ``targets``, per image and class
    (multi-label), averaged: the hinge errors 1 - logit * sign sorted in decreasing order, weighted by the gradient
    of the Lovász extension of the Jaccard loss. Every (image, class) pair at once: one sort of (B*C, H*W) and
    cumulative sums, no Python loop. Pixels outside ``valid`` (unlabelled) are sorted last with no error, so they
    change nothing. A pair with no pixel of its class costs its largest error (its most confident false positive)."""
    b, c = logits.shape[:2]
    flat = logits.float().reshape(b * c, -1)
    gt = targets.float().reshape(b * c, -1)
    errors = 1.0 - flat * (2.0 * gt - 1.0)
    if valid is not None:
        keep = valid.expand(b, c, *valid.shape[2:]).reshape(b * c, -1)
        errors = torch.where(keep, errors, torch.full_like(errors, -1e4))
        gt = gt * keep
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    gt_sorted = torch.gather(gt, 1, order)
    positives = gt_sorted.sum(1, keepdim=True)
    intersection = positives - gt_sorted.cumsum(1)
    union = positives + (1.0 - gt_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    return (F.relu(errors_sorted) * grad).sum(1).mean()


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
                 unlabelled: bool = False, dice_absent: str = "count", lovasz_weight: float = 1.0):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if dice_absent not in DICE_ABSENT:
            raise ValueError(f"dice_absent must be one of {DICE_ABSENT}, got {dice_absent!r}")
        self.task, self.smooth, self.loss, self.dice_absent = task, smooth, loss, dice_absent
        self.unlabelled = unlabelled  # masks may carry the ignore bit (the adapter's may_have_unlabelled)
        self.focal_gamma, self.alpha, self.beta = focal_gamma, tversky_alpha, tversky_beta
        self.classes, self.priority = tuple(classes), tuple(priority or classes)
        if loss in LOVASZ and task != "multilabel":
            raise ValueError(f"--loss {loss}: the Lovász hinge is per class, multilabel; use --task multilabel")
        self.pixel_weight = 0.0 if loss in ("dice", "lovasz") else pixel_weight
        self.dice_weight = 0.0 if loss in ("bce", "lovasz") else dice_weight
        self.lovasz_weight = lovasz_weight if loss in LOVASZ else 0.0

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor,
                 mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The loss of (B, K, H, W) ``logits`` against (B, H, W) ``packed`` masks. With ``unlabelled``, pixels
        whose ignore bit is set (unlabelled in the ground truth) count in no term; without it the masks have no
        such pixels and the plain means are taken (the same numbers, bit for bit, as before the ignore bit).
        ``mix`` (partner masks, lam), a MixUp batch: soft targets lam * y + (1 - lam) * y_partner, which for the
        per-pixel term (linear in its target) and the Lovász hinge (defined on hard labels) is the same mix of their
        two losses."""
        logits = logits.float()
        multiclass = self.task == "multiclass"
        valid = valid_pixels(packed) if self.unlabelled else None
        if mix is not None and valid is not None:
            valid = valid & valid_pixels(mix[0])
        labels, targets = self._targets(logits, packed)
        probs = torch.softmax(logits, 1)[:, 1:] if multiclass else torch.sigmoid(logits)
        if valid is not None:
            probs = probs * valid
        partner = self._targets(logits, mix[0]) if mix is not None else None
        lam = mix[1] if mix is not None else 1.0

        def mixed(term, *args):  # a term of hard labels, for the batch's own targets and the partner's
            own = term(labels, targets, *args)
            return own if partner is None else lam * own + (1.0 - lam) * term(*partner, *args)

        total = logits.new_zeros(())
        if self.pixel_weight:
            total = total + self.pixel_weight * mixed(self._pixel_term, logits, multiclass, valid)
        if self.dice_weight:
            alpha, beta = (self.alpha, self.beta) if self.loss == "tversky" else (0.5, 0.5)
            soft = targets if partner is None else lam * targets + (1.0 - lam) * partner[1]
            total = total + self.dice_weight * tversky_loss(probs, soft, alpha, beta, self.smooth, self.dice_absent)
        if self.lovasz_weight:
            total = total + self.lovasz_weight * mixed(lambda _, t, lg, v: lovasz_hinge(lg, t, v), logits, valid)
        return total

    def _targets(self, logits: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, targets): multiclass, the (B, H, W) class index and the (B, C, H, W) one-hot of the classes;
        multilabel, the (B, C, H, W) 0/1 targets twice."""
        if self.task == "multiclass":
            labels = multiclass_targets(packed, self.classes, self.priority)
            return labels, F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
        targets = unpack_targets(packed, logits.shape[1])
        return targets, targets

    def _pixel_term(self, labels: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor, multiclass: bool,
                    valid: torch.Tensor | None) -> torch.Tensor:
        if self.loss == "focal":
            return focal_loss(logits, labels, self.focal_gamma, multiclass, valid)
        if multiclass:
            return F.cross_entropy(logits, labels if valid is None else labels.masked_fill(~valid[:, 0], -100))
        if valid is None:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return _masked_mean(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), valid)


class PresenceLoss:
    """--task presence: the mean binary cross-entropy of (B, C) slice-classifier logits against whether each class
    shows on the slice (data/masks.py presence_targets of the augmented masks)."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor, mix=None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), presence_targets(packed, self.n_classes))
