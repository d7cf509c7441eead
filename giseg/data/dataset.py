"""Torch dataset over the decode-once cache."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from giseg.data.cache import SliceCache
from giseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_pixel_values


class SliceDataset(torch.utils.data.Dataset):
    """Items are {"pixel_values": (3, S, S) float32 normalised, "mask": (S, S) uint8 packed, "index": int}.

    ``rows`` are positions in the cache; ``neighbours`` (from data.neighbour_table) says which cached slices
    form the channels: one column is repeated 3 times, three columns are stacked (2.5D). ``transform`` is the
    training augmentation (None for evaluation and inference: the cache already has the model's size).

    The augmentation of a sample is a function of (``seed``, epoch, cache row) alone: it is seeded per item, so
    it does not depend on the number of data-loader workers, on which batches were loaded before, or on whether
    the run was resumed in the middle of the epoch. ``set_epoch`` reaches worker processes too (the epoch lives
    in shared memory).

    ``draw_from``/``draws`` (--empty_slice_fraction): besides ``rows``, each epoch takes ``draws`` rows of the pool
    ``draw_from`` (the organ-free slices), a different subset every epoch, chosen by (``seed``, epoch) alone.
    """

    def __init__(self, cache: SliceCache, rows: np.ndarray, neighbours: np.ndarray, transform: Callable | None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, seed: int = 0,
                 draw_from: np.ndarray | None = None, draws: int = 0):
        self.cache, self.rows, self.neighbours, self.transform = cache, np.asarray(rows), neighbours, transform
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)  # once, not per item
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.pool = np.asarray(draw_from if draw_from is not None else [], dtype=np.int64)
        self.draws = min(int(draws), len(self.pool))
        self._drawn: tuple[int, np.ndarray] | None = None  # (epoch, its rows from the pool), per process

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.rows) + self.draws

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The rows that item positions len(rows).. map to in ``epoch``."""
        if self._drawn is None or self._drawn[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x5EED]))
            self._drawn = (epoch, np.sort(rng.choice(self.pool, self.draws, replace=False)))
        return self._drawn[1]

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i]) if i < len(self.rows) else int(self.epoch_rows(int(self.epoch))[i - len(self.rows)])
        chans = self.neighbours[row]
        if len(chans) == 1:  # plain mode: augment one channel, repeat it at normalisation (3x less work)
            image = np.asarray(self.cache.images[chans[0]], dtype=np.float32)  # (S, S)
        else:
            image = np.ascontiguousarray(np.asarray(self.cache.images[chans], dtype=np.float32).transpose(1, 2, 0))
        mask = np.array(self.cache.masks[row])  # a writable copy of the memory-mapped row
        if self.transform is not None:
            seed_pipeline(self.transform, sample_seed(self.seed, int(self.epoch), row))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {"pixel_values": torch.from_numpy(to_pixel_values(image, self.mean, self.std)),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)), "index": row}


def seed_pipeline(pipeline, seed: int) -> None:
    """Seed an albumentations pipeline with ONE numpy and one Python generator shared by all its transforms, so
    they draw from one stream. (albumentations' own ``set_random_seed`` gives every transform a generator with the
    same seed: their first draws coincide, so flip, affine and brightness at p=0.5 would fire all together or not
    at all; it also costs 7x more.)"""
    rng, py = np.random.default_rng(seed), random.Random(seed)
    stack = [pipeline]
    while stack:
        t = stack.pop()
        t.random_generator, t.py_random = rng, py
        stack.extend(getattr(t, "transforms", ()))


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The augmentation seed of cache row ``row`` in ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1)[0])
