"""The base of the --loss recipes (one module each, registered in __init__.py): the batch's targets, its labelled
pixels and its MixUp partner prepared once, and the terms a recipe sums (per-pixel cross-entropy or focal, the
overlap term, the Lovász hinge). Multilabel on one sigmoid channel per class; multiclass on softmax over background
+ classes (the overlap term on the class channels; overlapping classes resolved by ``priority``, the adapter's)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from giseg.data.masks import multiclass_targets, unpack_targets, valid_pixels
from giseg.models.tasks import TASKS, get_task
from giseg.training.losses.terms import focal_loss, lovasz_hinge, masked_mean, tversky_loss

DICE_ABSENT = ("count", "skip")  # --dice_absent: a class absent from the whole batch counts in the overlap term, or not


@dataclass
class Batch:
    """One batch as every term needs it: hard ``labels`` and (B, C, H, W) ``targets`` (multiclass: class indices
    and the one-hot of the classes; multilabel: the 0/1 targets twice), class ``probs``, the labelled pixels
    (``valid``, None: all) and a MixUp ``partner`` (its labels and targets) with its weight 1 - ``lam``."""
    logits: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    valid: torch.Tensor | None
    partner: tuple[torch.Tensor, torch.Tensor] | None
    lam: float
    multiclass: bool

    def mixed(self, term) -> torch.Tensor:
        """A term of hard labels, for the batch's own targets and (MixUp) the partner's, mixed by ``lam``: the same
        as the term of the soft targets for a term linear in its target, and the definition for the Lovász hinge."""
        own = term(self.labels, self.targets)
        return own if self.partner is None else self.lam * own + (1.0 - self.lam) * term(*self.partner)

    def soft_targets(self) -> torch.Tensor:
        return self.targets if self.partner is None else self.lam * self.targets + (1.0 - self.lam) * self.partner[1]


class SegmentationLoss:
    """A --loss recipe: ``terms`` lists its (weight, term) pairs; a term of weight 0 is not computed."""
    name = ""
    tasks: tuple[str, ...] = tuple(t.name for t in TASKS.values() if t.segments)  # the tasks it is defined for

    def __init__(self, task: str, classes: tuple[str, ...], priority: tuple[str, ...] | None = None, *,
                 pixel_weight: float = 1.0, dice_weight: float = 1.0, lovasz_weight: float = 1.0,
                 focal_gamma: float = 2.0, tversky_alpha: float = 0.3, tversky_beta: float = 0.7,
                 dice_absent: str = "count", unlabelled: bool = False, smooth: float = 1.0):
        if task not in self.tasks:
            raise ValueError(f"--loss {self.name}: defined for --task {' or '.join(self.tasks)}, not {task}")
        if dice_absent not in DICE_ABSENT:
            raise ValueError(f"dice_absent must be one of {DICE_ABSENT}, got {dice_absent!r}")
        self.task, self.classes, self.priority = task, tuple(classes), tuple(priority or classes)
        self.pixel_weight, self.dice_weight, self.lovasz_weight = pixel_weight, dice_weight, lovasz_weight
        self.focal_gamma, self.alpha, self.beta = focal_gamma, tversky_alpha, tversky_beta
        self.dice_absent, self.smooth = dice_absent, smooth
        self.unlabelled = unlabelled  # masks may carry the ignore bit (the adapter's may_have_unlabelled)

    def terms(self, b: Batch) -> list[tuple[float, object]]:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor,
                 mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The loss of (B, K, H, W) ``logits`` against (B, H, W) ``packed`` masks. With ``unlabelled``, pixels
        whose ignore bit is set (unlabelled in the ground truth) count in no term; without it the masks have no
        such pixels and the plain means are taken (the same numbers, bit for bit, as before the ignore bit).
        ``mix`` (partner masks, lam), a MixUp batch: soft targets lam * y + (1 - lam) * y_partner."""
        b = self.batch(logits.float(), packed, mix)
        total = b.logits.new_zeros(())
        for weight, term in self.terms(b):
            if weight:
                total = total + weight * term(b)
        return total

    def batch(self, logits: torch.Tensor, packed: torch.Tensor, mix) -> Batch:
        multiclass = get_task(self.task).background
        valid = valid_pixels(packed) if self.unlabelled else None
        if mix is not None and valid is not None:
            valid = valid & valid_pixels(mix[0])
        labels, targets = self.targets(logits, packed)
        probs = torch.softmax(logits, 1)[:, 1:] if multiclass else torch.sigmoid(logits)
        if valid is not None:
            probs = probs * valid
        partner = self.targets(logits, mix[0]) if mix is not None else None
        return Batch(logits, labels, targets, probs, valid, partner, mix[1] if mix is not None else 1.0, multiclass)

    def targets(self, logits: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if get_task(self.task).background:
            labels = multiclass_targets(packed, self.classes, self.priority)
            return labels, F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
        targets = unpack_targets(packed, logits.shape[1])
        return targets, targets

    # ---- the terms recipes are made of
    def cross_entropy(self, b: Batch) -> torch.Tensor:
        """BCE (multilabel) or cross-entropy (multiclass), over the labelled pixels."""
        def term(labels, targets):
            if b.multiclass:
                ignored = labels if b.valid is None else labels.masked_fill(~b.valid[:, 0], -100)
                return F.cross_entropy(b.logits, ignored)
            if b.valid is None:
                return F.binary_cross_entropy_with_logits(b.logits, targets)
            return masked_mean(F.binary_cross_entropy_with_logits(b.logits, targets, reduction="none"), b.valid)
        return b.mixed(term)

    def focal(self, b: Batch) -> torch.Tensor:
        return b.mixed(lambda labels, _: focal_loss(b.logits, labels, self.focal_gamma, b.multiclass, b.valid))

    def overlap(self, b: Batch, alpha: float = 0.5, beta: float = 0.5) -> torch.Tensor:
        """Soft Dice (alpha = beta = 0.5) or Tversky of the class probabilities against the (soft) targets."""
        return tversky_loss(b.probs, b.soft_targets(), alpha, beta, self.smooth, self.dice_absent)

    def lovasz(self, b: Batch) -> torch.Tensor:
        return b.mixed(lambda _, targets: lovasz_hinge(b.logits, targets, b.valid))
