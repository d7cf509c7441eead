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


def prepare_scan(raw: np.ndarray, size: int, crop: tuple[slice, slice] | None = None) -> np.ndarray:
    """A raw (H, W) scan as the model sees it before normalisation: (size, size) float16 in [0, 1]; ``crop``
    (--body_crop) cuts it after the scaling (percentiles of the whole slice) and before the resize."""
    scan = normalise_scan(raw)
    if crop is not None:
        scan = np.ascontiguousarray(scan[crop])
    return resize_image(scan, size).astype(np.float16)


BODY_THRESHOLD = 0.1  # --body_crop: the body is what is brighter than this on the slice's [0, 1] scale


def body_box(scan: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the bounding box of the largest 8-connected component of a [0, 1] slice above
    BODY_THRESHOLD (the body; an arm or a coil's bright rim is a smaller component and falls outside). The whole
    slice when nothing is above it."""
    fg = (scan > BODY_THRESHOLD).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return 0, scan.shape[0], 0, scan.shape[1]
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[k, :4])
    return y, y + h, x, x + w


def crop_box(box: tuple[int, int, int, int], shape: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` pixels on every side, then its shorter side grown to a square (the crop keeps the
    scan's aspect when resized to the model's square size), shifted and clipped to fit a slice of ``shape``."""
    y0, y1, x0, x1 = box[0] - margin, box[1] + margin, box[2] - margin, box[3] + margin
    side = max(y1 - y0, x1 - x0)
    out = []
    for lo, hi, size in ((y0, y1, shape[0]), (x0, x1, shape[1])):
        lo -= (side - (hi - lo)) // 2
        hi = lo + side
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > size:
            lo, hi = max(0, lo - (hi - size)), size
        out += [lo, hi]
    return tuple(out)


def to_pixel_values(image: np.ndarray, mean, std) -> np.ndarray:
    """(S, S) one channel (repeated to 3 here: 3x less augmentation work) or (S, S, 3) channels-last float32
    image in [0, 1] -> (3, S, S) float32 normalised with the model's ``mean`` and ``std``."""
    chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray((chw - mean) / std, dtype=np.float32)
