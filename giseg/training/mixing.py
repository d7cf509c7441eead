"""CutMix and MixUp of a training batch (``--cutmix_prob``, ``--mixup_prob``, ``--mix_alpha``), images and masks alike.

Each batch, with probability ``cutmix_prob``, a box of the images and of their masks is replaced by the same box of
a partner in the batch (a permutation): the masks stay hard. Otherwise, with probability ``mixup_prob``, the images
are blended, ``lam * x + (1 - lam) * x[partner]``, and the loss sees soft targets, ``lam * y + (1 - lam) *
y[partner]`` (the ``mix`` of losses.SegmentationLoss). ``lam`` ~ Beta(alpha, alpha); CutMix's box covers 1 - lam of the
image. Every draw is a function of (seed, epoch, batch of the epoch, process) alone, as the augmentation's are: a
resumed run replays the same mixes. Evaluation never mixes.
"""
from __future__ import annotations

import numpy as np
import torch

MIX_SALT = 0xC07A1  # keeps these draws apart from the augmentation's, which use the same seed


class BatchMixer:
    def __init__(self, cutmix_prob: float, mixup_prob: float, alpha: float, seed: int):
        self.cutmix_prob, self.mixup_prob, self.alpha, self.seed = cutmix_prob, mixup_prob, alpha, seed

    def draw(self, epoch: int, batch: int, process: int, size: int, shape: tuple[int, int]):
        """(kind: "cutmix", "mixup" or "", partner permutation, lam, box (y0, y1, x0, x1)) of one batch."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, batch, process, MIX_SALT]))
        u, lam, perm = rng.random(), float(rng.beta(self.alpha, self.alpha)), rng.permutation(size)
        if u < self.cutmix_prob:
            h, w = shape
            cut = np.sqrt(1.0 - lam)
            cy, cx = rng.integers(h), rng.integers(w)
            y0, y1 = int(np.clip(cy - cut * h / 2, 0, h)), int(np.clip(cy + cut * h / 2, 0, h))
            x0, x1 = int(np.clip(cx - cut * w / 2, 0, w)), int(np.clip(cx + cut * w / 2, 0, w))
            return "cutmix", perm, lam, (y0, y1, x0, x1)
        if u < self.cutmix_prob + self.mixup_prob:
            return "mixup", perm, lam, None
        return "", perm, lam, None

    def __call__(self, pixels: torch.Tensor, masks: torch.Tensor, epoch: int, batch: int, process: int = 0):
        """The batch mixed: (pixels, packed masks, mix) where mix is None or (partner masks, lam) for the loss's
        soft targets (MixUp)."""
        kind, perm, lam, box = self.draw(epoch, batch, process, pixels.shape[0], tuple(masks.shape[-2:]))
        if not kind or pixels.shape[0] < 2:
            return pixels, masks, None
        partner = torch.as_tensor(perm, device=pixels.device)
        if kind == "mixup":
            return pixels * lam + pixels[partner] * (1.0 - lam), masks, (masks[partner], lam)
        y0, y1, x0, x1 = box
        pixels, masks = pixels.clone(), masks.clone()
        pixels[..., y0:y1, x0:x1] = pixels[partner][..., y0:y1, x0:x1]
        masks[..., y0:y1, x0:x1] = masks[partner][..., y0:y1, x0:x1]
        return pixels, masks, None
