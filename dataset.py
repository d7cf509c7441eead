"""Torch dataset over the decode-once cache."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cache import SliceCache
from preprocess import IMAGENET_MEAN, IMAGENET_STD, to_pixel_values


class SliceDataset(torch.utils.data.Dataset):
    """Items are {"pixel_values": (3, S, S) float32 normalised, "mask": (S, S) uint8 packed, "index": int}.

    ``rows`` are positions in the cache; ``neighbours`` (from data.neighbour_table) says which cached slices
    form the channels: one column is repeated 3 times, three columns are stacked (2.5D). ``transform`` is the
    training augmentation (None for evaluation and inference: the cache already has the model's size).
    """

    def __init__(self, cache: SliceCache, rows: np.ndarray, neighbours: np.ndarray, transform: Callable | None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.cache, self.rows, self.neighbours, self.transform = cache, np.asarray(rows), neighbours, transform
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)  # once, not per item

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        chans = self.neighbours[row]
        if len(chans) == 1:  # plain mode: augment one channel, repeat it at normalisation (3x less work)
            image = np.asarray(self.cache.images[chans[0]], dtype=np.float32)  # (S, S)
        else:
            image = np.ascontiguousarray(np.asarray(self.cache.images[chans], dtype=np.float32).transpose(1, 2, 0))
        mask = np.array(self.cache.masks[row])  # a writable copy of the memory-mapped row
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {"pixel_values": torch.from_numpy(to_pixel_values(image, self.mean, self.std)),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)), "index": row}


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's augmentation its own stream, derived from the torch
    seed that the loader hands the worker (itself drawn from the seeded main process), so runs repeat."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)
