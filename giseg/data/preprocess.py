"""Input preparation, one path for training and inference: a raw scan -> [0, 1] -> the model's size (float16,
as the decode-once cache stores it) -> the model's channels, normalised with its mean and std."""
from __future__ import annotations

import cv2
import numpy as np

# ImageNet statistics: what SegFormer / UperNet-ConvNeXt checkpoints were trained with (DPT and BEiT use 0.5).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_scan(img: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Scale one slice to float32 in [0, 1] between its own 0.5th and 99.5th intensity percentiles.

    Per-slice percentiles make the scaling robust to the few very bright outlier pixels that MRI scans carry
    and to scanner-to-scanner intensity differences; an all-constant slice becomes all zeros.
    """
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, [low_pct, high_pct])
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) float image to (size, size): area averaging when shrinking, bilinear when growing."""
    interp = cv2.INTER_AREA if img.shape[0] > size and img.shape[1] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) integer mask to (size, size) with nearest neighbour (keeps packed class bits intact)."""
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def prepare_scan(raw: np.ndarray, size: int) -> np.ndarray:
    """A raw (H, W) scan as the model sees it before normalisation: (size, size) float16 in [0, 1]."""
    return resize_image(normalise_scan(raw), size).astype(np.float16)


def to_pixel_values(image: np.ndarray, mean, std) -> np.ndarray:
    """(S, S) one channel (repeated to 3 here: 3x less augmentation work) or (S, S, 3) channels-last float32
    image in [0, 1] -> (3, S, S) float32 normalised with the model's ``mean`` and ``std``."""
    chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray((chw - mean) / std, dtype=np.float32)
