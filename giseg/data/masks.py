"""Masks packed one byte per pixel, bit c = class c, so that classes which overlap stay overlapping.

The decode-once cache stores packed masks, augmentation moves them with nearest-neighbour sampling (no blended
bit patterns), and the loss and metrics unpack them on the device. Bits 0-6 hold up to 7 classes; bit 7
(``IGNORE_BIT``) marks pixels that the ground truth leaves unlabelled (label 255 in a label map, as in the
Hugging Face convention): the loss and the metrics leave them out.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_CLASSES = 7
IGNORE_BIT = 7


def class_name_problems(names) -> list[str]:
    """Why ``names`` cannot be a model's classes (empty list: they can): 1 to MAX_CLASSES distinct names, each a
    non-empty string without path separators or control characters, not '.' or '..' (names become column, file
    and metric names), not 'background' (multiclass models add it themselves)."""
    names = list(names)
    if not 1 <= len(names) <= MAX_CLASSES:
        return [f"1 to {MAX_CLASSES} class names, got {len(names)}: {names}"]
    for n in names:
        if not isinstance(n, str) or not n.strip() or n != n.strip() or n in (".", "..") or len(n) > 64 \
                or any(ch in n for ch in "/\\") or any(ord(ch) < 32 for ch in n):
            return [f"class name {n!r} cannot be used: names are 1 to 64 characters without '/', '\\', control "
                    "characters or outer spaces, and not '.' or '..' (they become file and column names)"]
        if n.lower() == "background":
            return ["class name 'background' is reserved (a multiclass model's channel 0); leave it out of the classes"]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        return [f"class names must be distinct; {dup[0]!r} appears {names.count(dup[0])} times in {names}"]
    return []


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(C, H, W) 0/1 masks -> (H, W) uint8 with bit c set where class c is present."""
    bits = (1 << np.arange(masks.shape[0], dtype=np.uint8))[:, None, None]
    return (masks.astype(np.uint8) * bits).sum(axis=0, dtype=np.uint8)


def unpack_masks(packed: np.ndarray, n_classes: int) -> np.ndarray:
    """(..., H, W) packed uint8 -> (..., C, H, W) uint8 0/1."""
    bits = np.arange(n_classes, dtype=np.uint8)[:, None, None]
    return (packed[..., None, :, :] >> bits) & 1


def classes_present(packed: np.ndarray, rows: np.ndarray, n_classes: int, chunk: int = 512) -> np.ndarray:
    """(len(rows), C) bool: does packed mask ``rows[i]`` show class c anywhere? One OR over each slice's bytes,
    read ``chunk`` slices at a time (``packed`` is usually the memory-mapped cache)."""
    bits = np.concatenate([np.bitwise_or.reduce(packed[rows[i:i + chunk]].reshape(len(rows[i:i + chunk]), -1), axis=1)
                           for i in range(0, len(rows), chunk)] or [np.zeros(0, np.uint8)])
    return ((bits[:, None] >> np.arange(n_classes, dtype=np.uint8)) & 1).astype(bool)


def any_labelled(packed: np.ndarray, rows: np.ndarray, chunk: int = 512) -> bool:
    """Does any pixel of packed masks ``rows`` carry a label (its ignore bit clear)? Read ``chunk`` slices at a
    time, stopping at the first that does."""
    for i in range(0, len(rows), chunk):
        if ((packed[rows[i:i + chunk]] >> IGNORE_BIT) == 0).any():
            return True
    return False


def unpack_targets(packed: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, H, W) packed uint8 -> (B, C, H, W) float 0/1 multi-label targets, on packed's device."""
    bits = torch.arange(n_classes, device=packed.device, dtype=torch.uint8).view(1, -1, 1, 1)
    return ((packed.unsqueeze(1) >> bits) & 1).float()


def valid_pixels(packed: torch.Tensor) -> torch.Tensor:
    """(B, H, W) packed -> (B, 1, H, W) bool: True where the pixel is labelled (its ignore bit is clear)."""
    return ((packed >> IGNORE_BIT) & 1).eq(0).unsqueeze(1)


def presence_targets(packed: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, H, W) packed masks -> (B, C) float 0/1: does the slice show the class (on a labelled pixel); the
    targets of a slice classifier (--task presence)."""
    return (unpack_targets(packed, n_classes) * valid_pixels(packed)).flatten(2).amax(2)


def multiclass_targets(packed: torch.Tensor, classes: tuple[str, ...], priority: tuple[str, ...]) -> torch.Tensor:
    """(B, H, W) packed -> (B, H, W) long: 0 background, 1 + index in ``classes`` for a class.

    Where classes overlap, the one that comes first in ``priority`` (the dataset adapter's) wins."""
    out = torch.zeros(packed.shape, dtype=torch.long, device=packed.device)
    for name in reversed(priority):  # lowest priority first, higher ones overwrite
        c = classes.index(name)
        out = torch.where(((packed >> c) & 1).bool(), torch.full_like(out, c + 1), out)
    return out
