"""Run-length codes of the UW-Madison GI-tract competition, decoded and encoded with numpy.

A code is a space-separated list of ``start length`` pairs. Starts are 1-indexed and pixels are numbered
row-major over the (H, W) image, i.e. ``flat = row * W + col``. (The competition text says "top to bottom,
then left to right", but the data itself is row-major: decoded column-major, organs come out as sheared
stripes.) An empty code means "no organ".
"""
from __future__ import annotations

import math

import numpy as np


class RLEError(ValueError):
    """A malformed run-length code; the message names the slice id and class when given."""


def _is_empty(code: object) -> bool:
    if code is None:
        return True
    if isinstance(code, float) and math.isnan(code):  # pandas reads empty cells as NaN
        return True
    return isinstance(code, str) and code.strip() == ""


def parse_rle(code: str | float | None, shape: tuple[int, int], where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Validate ``code`` for an image of ``shape`` = (H, W); return 0-indexed (starts, ends) of its runs.

    Raises RLEError for an odd token count, a non-integer token, a start < 1, a length < 1, a run past
    H*W, or runs that overlap or are not sorted.
    """
    if _is_empty(code):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    prefix = f"{where}: " if where else ""
    if not isinstance(code, str):
        raise RLEError(f"{prefix}run-length code must be a string, got {type(code).__name__} {code!r}")
    tokens = code.split()
    if len(tokens) % 2:
        raise RLEError(f"{prefix}odd number of tokens ({len(tokens)}) in run-length code; expected 'start length' pairs")
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not t.lstrip("+-").isdigit())
        raise RLEError(f"{prefix}non-integer token {bad!r} in run-length code") from None
    starts, lengths = values[0::2] - 1, values[1::2]
    h, w = shape
    n = h * w
    if (starts < 0).any():
        raise RLEError(f"{prefix}run start {int(starts[starts < 0][0]) + 1} < 1 (starts are 1-indexed)")
    if (lengths < 1).any():
        raise RLEError(f"{prefix}run length {int(lengths[lengths < 1][0])} < 1")
    ends = starts + lengths
    if (ends > n).any():
        i = int(np.argmax(ends > n))
        raise RLEError(f"{prefix}run '{starts[i] + 1} {lengths[i]}' ends at pixel {ends[i]}, past the image's "
                       f"{h}x{w}={n} pixels (H x W)")
    if len(starts) > 1 and (starts[1:] < ends[:-1]).any():
        i = int(np.argmax(starts[1:] < ends[:-1])) + 1
        raise RLEError(f"{prefix}run starting at {starts[i] + 1} overlaps or precedes the previous run "
                       f"(runs must be sorted and disjoint)")
    return starts, ends


def decode_rle(code: str | float | None, shape: tuple[int, int], where: str = "") -> np.ndarray:
    """Decode a run-length code into a (H, W) uint8 mask of 0/1. ``shape`` is (H, W), not (W, H)."""
    starts, ends = parse_rle(code, shape, where)
    h, w = shape
    edges = np.zeros(h * w + 1, dtype=np.int32)
    edges[starts] += 1  # starts are strictly increasing, so no index repeats within one assignment
    edges[ends] -= 1
    return (np.cumsum(edges[:-1]) > 0).astype(np.uint8).reshape(h, w)


def encode_rle(mask: np.ndarray) -> str:
    """Encode a (H, W) mask (non-zero = organ) as a row-major, 1-indexed run-length code ('' when empty)."""
    flat = np.asarray(mask).ravel() != 0
    padded = np.concatenate(([False], flat, [False]))
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))
