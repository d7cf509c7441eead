"""The training augmentation (albumentations 2.x). Images arrive already resized to the training size by the
decode-once cache, as float32 in [0, 1]; masks arrive packed (one uint8 per pixel, a bit per class), and every
geometric transform here uses nearest-neighbour for masks, so packed bits survive and overlaps stay."""
from __future__ import annotations

import os

import cv2

from giseg.data.masks import IGNORE_BIT


def import_albumentations():
    """albumentations, imported without its update check: that check asks the network at import (a call home, and
    a wait on an offline machine) unless NO_ALBUMENTATIONS_UPDATE is set. Set for the import only, then restored."""
    previous = os.environ.get("NO_ALBUMENTATIONS_UPDATE")
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    try:
        import albumentations
    finally:
        if previous is None:
            del os.environ["NO_ALBUMENTATIONS_UPDATE"]
        else:
            os.environ["NO_ALBUMENTATIONS_UPDATE"] = previous
    return albumentations


def train_transform(image_size: int, strong: bool = False, seed: int | None = None, unlabelled: bool = False):
    """Flips, affine scale/shift/rotate, brightness/contrast and coarse dropout; ``strong`` adds elastic, grid
    and optical distortion, blur and gamma. ``seed`` fixes the pipeline's own random state (albumentations
    ignores the global seeds); data/dataset.py's SliceDataset re-seeds it per sample from (seed, epoch, row).
    The affine's padding is background (0) or, for data whose labels may be ``unlabelled`` (a label map with 255),
    unlabelled too (the ignore bit): pixels nobody labelled are not made into labelled background."""
    A = import_albumentations()
    fill_mask = 1 << IGNORE_BIT if unlabelled else 0
    ops = [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-15, 15),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=fill_mask, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
    ]
    if strong:
        ops += [
            A.OneOf([
                A.ElasticTransform(alpha=30, sigma=6, p=1.0),
                A.GridDistortion(num_steps=5, distort_limit=0.2, p=1.0),
                A.OpticalDistortion(distort_limit=0.2, p=1.0),
            ], p=0.25),
            A.GaussianBlur(blur_limit=(3, 5), p=0.15),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        ]
    ops.append(A.CoarseDropout(num_holes_range=(1, 5), hole_height_range=(0.04, 0.1), hole_width_range=(0.04, 0.1),
                               fill=0, p=0.3))
    return A.Compose(ops, seed=seed)
