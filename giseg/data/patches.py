"""Volumes for 3D models, read from the decode-once cache: random training patches and whole volumes.

A volume is the slices of one scan (the rows sharing the adapter's ``volume_columns``, e.g. a GI case-day) in slice
order. The slice axis keeps its spacing (GI: 3 mm between slices at ~1.5 mm pixels): only rows and columns were
resized, to --image_size, when the cache was built, so the model's masks are the per-slice masks every other path
scores and writes. Items:

    PatchDataset    {"pixel_values": (C, d, h, w) float32, "mask": (d, h, w) uint8 packed, "index": (d,) rows}
    VolumeDataset   {"pixel_values": (C, D, S, S) float32, "mask": (D, S, S) uint8 packed, "index": (D,) rows}

A training patch is centred on a voxel of a class the volume shows with probability ``foreground`` (nnU-Net's
oversampling of foreground: 1/3), so that small organs are seen; otherwise anywhere. Like SliceDataset's, a
patch and its augmentation (a left-right flip, intensity scale and shift) are a function of (seed, epoch, item)
alone: independent of data-loader workers and of a resume in the middle of an epoch.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from giseg.data.cache import SliceCache

FOREGROUND = 1 / 3  # share of patches centred on an organ (nnU-Net's oversample_foreground_percent)
LOCATIONS = 10_000  # voxels kept per volume and class to centre patches on (nnU-Net keeps 10,000 too)


def volume_rows(index: pd.DataFrame, rows: np.ndarray, volume_columns: tuple[str, ...]) -> list[np.ndarray]:
    """The volumes that ``rows`` of ``index`` belong to, each as its rows of ``rows`` in slice order, in the order
    of their first row."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return []
    part = index.iloc[rows]
    keys = part.groupby(list(volume_columns), sort=False).ngroup().to_numpy()  # numbered by first appearance
    order = np.lexsort((part["slice"].to_numpy(), keys))  # by volume, then slice (stable)
    return np.split(rows[order], np.flatnonzero(np.diff(keys[order])) + 1)


def read_volume(cache: SliceCache, rows: np.ndarray, channels: int, mean, std) -> np.ndarray:
    """(C, D, S, S) float32 normalised images of a volume's ``rows`` (row r's channel m is cache image
    r * channels + m)."""
    positions = (rows[None, :] * channels + np.arange(channels)[:, None]).ravel()
    images = np.asarray(cache.images[positions], dtype=np.float32).reshape(channels, len(rows), *cache.images.shape[1:])
    mean = np.asarray(mean, np.float32)[:, None, None, None]
    std = np.asarray(std, np.float32)[:, None, None, None]
    return (images - mean) / std


class VolumeDataset(torch.utils.data.Dataset):
    """Whole volumes (evaluation and inference), one per item: load with batch_size 1."""

    def __init__(self, cache: SliceCache, volumes: list[np.ndarray], channels: int, mean, std):
        self.cache, self.volumes, self.channels, self.mean, self.std = cache, volumes, channels, mean, std

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict:
        rows = self.volumes[i]
        return {"pixel_values": torch.from_numpy(read_volume(self.cache, rows, self.channels, self.mean, self.std)),
                "mask": torch.from_numpy(np.asarray(self.cache.masks[rows])), "index": torch.from_numpy(rows)}


class PatchDataset(torch.utils.data.Dataset):
    """``length`` random patches of size ``patch`` (d, h, w) per epoch from ``volumes``; item i comes from volume
    i mod len(volumes). ``augment``: flips and intensity changes (training)."""

    def __init__(self, cache: SliceCache, volumes: list[np.ndarray], patch: tuple[int, int, int], channels: int,
                 n_classes: int, mean, std, seed: int, length: int, augment: bool = True,
                 foreground: float = FOREGROUND):
        self.cache, self.volumes, self.patch, self.channels = cache, volumes, tuple(patch), channels
        self.n_classes = n_classes
        self.mean, self.std, self.seed, self.length = mean, std, seed, length
        self.augment, self.foreground = augment, foreground
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._where: dict[int, list[np.ndarray]] = {}  # per volume and class, voxels to centre on (per process)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(self.epoch), i, 0x3D]))
        v = i % len(self.volumes)
        rows = self.volumes[v]
        shape = (len(rows), *self.cache.masks.shape[1:])
        start = patch_start(shape, self.locations(v), self.patch, rng, self.foreground)
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        image = read_volume(self.cache, rows[window[0]], self.channels, self.mean, self.std)[:, :, window[1], window[2]]
        mask = np.asarray(self.cache.masks[rows[window[0]]])[:, window[1], window[2]]
        blank = -np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)  # a scan's 0, normalised
        image, mask = pad_to(image, self.patch, blank), pad_to(mask, self.patch, 0)
        if self.augment:
            image, mask = augment(image, mask, rng)
        index = rows[window[0]]
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)),
                "index": torch.from_numpy(np.pad(index, (0, self.patch[0] - len(index)), constant_values=-1))}


    def locations(self, v: int) -> list[np.ndarray]:
        """Volume ``v``'s voxels of each class (flat indices; at most LOCATIONS, a sample drawn from (seed, v)),
        read from its masks once per process."""
        if v not in self._where:
            masks = np.asarray(self.cache.masks[self.volumes[v]])
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, v, 0x10C]))
            where = [np.flatnonzero(masks & (1 << c)) for c in range(self.n_classes)]
            self._where[v] = [np.sort(rng.choice(w, LOCATIONS, replace=False)) if len(w) > LOCATIONS else w
                              for w in where]
        return self._where[v]


def patch_start(shape: tuple[int, int, int], locations: list[np.ndarray], patch: tuple[int, int, int],
                rng: np.random.Generator, foreground: float) -> tuple[int, ...]:
    """The first voxel of a patch of a volume of ``shape``: centred on a random voxel of ``locations`` (per class,
    flat indices) of a random class the volume shows (probability ``foreground``), else uniform; kept inside the
    volume where it fits (a volume smaller than the patch starts at 0 and is padded)."""
    high = [max(0, n - p) for n, p in zip(shape, patch)]
    if rng.random() < foreground:
        present = [w for w in locations if len(w)]
        if present:
            voxels = present[rng.integers(len(present))]
            centre = np.unravel_index(voxels[rng.integers(len(voxels))], shape)
            return tuple(int(min(max(0, c - p // 2), h)) for c, p, h in zip(centre, patch, high))
    return tuple(int(rng.integers(h + 1)) for h in high)


def pad_to(array: np.ndarray, patch: tuple[int, int, int], value) -> np.ndarray:
    """``array`` (..., d, h, w) padded at the end of each of its last three axes to ``patch``: with ``value`` (one
    per leading channel, or a scalar)."""
    missing = [p - n for n, p in zip(array.shape[-3:], patch)]
    if not any(missing):
        return array
    lead = array.ndim - 3
    out = np.empty((*array.shape[:lead], *patch), dtype=array.dtype)
    out[...] = np.asarray(value, dtype=array.dtype).reshape((-1,) + (1,) * 3) if lead else value
    out[(...,) + tuple(slice(0, n) for n in array.shape[-3:])] = array
    return out


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A left-right flip (p 0.5; the slices' columns), then the intensities scaled by U(0.85, 1.15) and shifted by
    U(-0.15, 0.15) (p 0.5 each), as the 2D pipeline's brightness and contrast."""
    if rng.random() < 0.5:
        image, mask = image[..., ::-1], mask[..., ::-1]
    scale = rng.uniform(0.85, 1.15) if rng.random() < 0.5 else 1.0
    shift = rng.uniform(-0.15, 0.15) if rng.random() < 0.5 else 0.0
    return image * np.float32(scale) + np.float32(shift), mask
