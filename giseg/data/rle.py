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
    if code.isascii() and code.encode().translate(None, b" ").isdigit():  # fast path: one C-level parse
        values = np.fromstring(code, dtype=np.int64, sep=" ")
    else:
        values = _parse_slowly(code, prefix)
    if len(values) % 2:
        raise RLEError(f"{prefix}odd number of tokens ({len(values)}) in run-length code; expected 'start length' pairs")
    n = shape[0] * shape[1]
    if len(values) and not (values.min() >= 1 and values.max() <= n):  # also rules out int64 overflow below
        _raise_specific(values, shape, prefix)
    starts, lengths = values[0::2] - 1, values[1::2]
    ends = starts + lengths
    # sorted, disjoint runs make ends[-1] the largest end
    if len(starts) and (ends[-1] > n or (starts[1:] < ends[:-1]).any()):
        _raise_specific(values, shape, prefix)
    return starts, ends


def _parse_slowly(code: str, prefix: str) -> np.ndarray:
    """Token by token, for codes with something besides ASCII digits and spaces: precise errors."""
    tokens = code.split()
    bad = next((t for t in tokens if not t.lstrip("-").isdigit()), None)
    if bad is not None:
        raise RLEError(f"{prefix}non-integer token {bad!r} in run-length code")
    try:
        return np.array(tokens, dtype=np.int64)
    except (OverflowError, ValueError):
        raise RLEError(f"{prefix}integer token out of range in run-length code") from None


def _raise_specific(values: np.ndarray, shape: tuple[int, int], prefix: str) -> None:
    """The precise error for a code that failed the quick checks."""
    h, w = shape
    n = h * w
    if values.max() >= 2**62:
        raise RLEError(f"{prefix}integer token out of range in run-length code")
    starts, lengths = values[0::2] - 1, values[1::2]
    ends = starts + lengths
    if (starts < 0).any():
        raise RLEError(f"{prefix}run start {int(starts[starts < 0][0]) + 1} < 1 (starts are 1-indexed)")
    if (lengths < 1).any():
        raise RLEError(f"{prefix}run length {int(lengths[lengths < 1][0])} < 1")
    if (starts[1:] < ends[:-1]).any():
        i = int(np.argmax(starts[1:] < ends[:-1])) + 1
        raise RLEError(f"{prefix}run starting at {starts[i] + 1} overlaps or precedes the previous run "
                       f"(runs must be sorted and disjoint)")
    i = int(np.argmax(ends > n))
    raise RLEError(f"{prefix}run '{starts[i] + 1} {lengths[i]}' ends at pixel {ends[i]}, past the image's "
                   f"{h}x{w}={n} pixels (H x W)")


def decode_rle(code: str | float | None, shape: tuple[int, int], where: str = "",
               out: np.ndarray | None = None) -> np.ndarray:
    """Decode a run-length code into a (H, W) uint8 mask of 0/1. ``shape`` is (H, W), not (W, H).

    Only the span from the first run's start to the last run's end is written, in one ``np.repeat`` of
    alternating 1/0 values by the run lengths and gaps; ``out`` (H*W or (H, W), uint8, zeroed by the caller)
    avoids allocating a new mask."""
    starts, ends = parse_rle(code, shape, where)
    h, w = shape
    if out is not None and not (out.flags.c_contiguous and out.size == h * w and out.dtype == np.uint8):
        raise ValueError(f"out must be a C-contiguous uint8 array of {h}x{w} pixels, got {out.dtype} {out.shape}")
    flat = np.zeros(h * w, dtype=np.uint8) if out is None else out.reshape(-1)  # a view: out is contiguous
    if len(starts):
        counts = np.empty(2 * len(starts) - 1, dtype=np.int64)  # run, gap, run, ..., run
        counts[0::2] = ends - starts
        counts[1::2] = starts[1:] - ends[:-1]
        values = np.zeros(len(counts), dtype=np.uint8)
        values[0::2] = 1
        flat[starts[0]:ends[-1]] = np.repeat(values, counts)
    return flat.reshape(h, w)


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
