"""Volumes of an index: same-size checks, and the 2.5D neighbour table (slices at -stride, 0, +stride)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from giseg.utils.errors import UserError


def check_volume_sizes(index: pd.DataFrame, volume_columns: tuple[str, ...], where: str) -> None:
    """Every slice of a volume (e.g. a case-day) has one scan size, as 3D metrics need; else one line naming it."""
    sizes = index.groupby(list(volume_columns))[["height", "width"]].nunique()
    mixed = sizes[(sizes > 1).any(axis=1)]
    if len(mixed):
        key = mixed.index[0]
        key = key if isinstance(key, tuple) else (key,)
        sel = np.logical_and.reduce([index[c].to_numpy() == k for c, k in zip(volume_columns, key)])
        shapes = sorted({f"{w}x{h}" for w, h in zip(index.loc[sel, "width"], index.loc[sel, "height"])})
        raise UserError(f"{where}: {len(mixed)} volume(s) mix scan sizes, e.g. {dict(zip(volume_columns, key))} has "
                        f"{', '.join(shapes)}; every slice of a volume needs one size")


def neighbour_table(index: pd.DataFrame, context_slices: int = 1, stride: int = 2,
                    volume_columns: tuple[str, ...] = ("case", "day"), channels: int = 1) -> np.ndarray:
    """(N, context_slices * channels) positions in the decode-once cache's images of what is stacked as the input
    channels of each slice: its neighbours' rows, or with several image ``channels`` per slice (stored one after
    another: row r's channel m at r * channels + m) each neighbour's channels in turn.

    context_slices=1 gives the slice itself (repeated into 3 channels later); 3 gives the slices at
    -stride, 0, +stride (5: -2 stride ... +2 stride) of the same volume (rows sharing ``volume_columns``, the adapter's). At a volume end a missing neighbour is replaced by the nearest
    slice that exists on that side's way back to the centre (so the first slice uses itself for -stride).
    """
    if context_slices < 1 or context_slices % 2 == 0:
        raise UserError(f"--context_slices must be odd: 1 (plain), 3, 5 ... (2.5D), got {context_slices}")
    if stride < 1:
        raise UserError(f"--context_stride must be >= 1, got {stride}")
    offsets = (np.arange(context_slices) - context_slices // 2) * stride
    out = np.empty((len(index), context_slices), dtype=np.int64)
    for _, grp in index.groupby(list(volume_columns), sort=False):
        rows = grp.index.to_numpy()
        order = np.argsort(grp["slice"].to_numpy(), kind="stable")
        nums, rows = grp["slice"].to_numpy()[order], rows[order]
        target = nums[:, None] + offsets[None, :]
        pos = np.searchsorted(nums, target)  # first slice >= target
        pos = np.clip(pos, 0, len(nums) - 1)
        exact = nums[pos] == target
        # no exact neighbour: step back towards the centre slice (which always exists)
        below = np.clip(np.searchsorted(nums, target, side="right") - 1, 0, len(nums) - 1)
        fallback = np.where(offsets[None, :] > 0, below, pos)
        out[rows] = rows[np.where(exact, pos, fallback)]
    if channels > 1:
        return (out[:, :, None] * channels + np.arange(channels)).reshape(len(index), -1)
    return out
