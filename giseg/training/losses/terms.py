"""The terms the --loss recipes are made of, on logits already upsampled to the mask size: soft Dice / Tversky,
the Lovász hinge, focal loss, and a mean over labelled pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
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
        return masked_mean(-(1 - logp.exp()) ** gamma * logp, valid)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return masked_mean((1 - p_true) ** gamma * bce, valid)
