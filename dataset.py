"""Torch dataset over the decode-once cache, and the on-device conversion of packed masks to targets."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cache import SliceCache
from utils import CLASSES, MULTICLASS_PRIORITY

# ImageNet statistics: what SegFormer / UperNet-ConvNeXt checkpoints were trained with (DPT and BEiT use 0.5).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SliceDataset(torch.utils.data.Dataset):
    """Items are {"pixel_values": (3, S, S) float32 normalised, "mask": (S, S) uint8 packed, "index": int}.

    ``rows`` are positions in the cache; ``neighbours`` (from data.neighbour_table) says which cached slices
    form the channels: one column is repeated 3 times, three columns are stacked (2.5D).
    """

    def __init__(self, cache: SliceCache, rows: np.ndarray, neighbours: np.ndarray, transform: Callable | None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.cache, self.rows, self.neighbours, self.transform = cache, np.asarray(rows), neighbours, transform
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

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
        chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        pixels = (chw - self.mean[:, None, None]) / self.std[:, None, None]  # broadcasts 1 channel to 3
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)), "index": row}


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's augmentation its own stream, derived from the torch
    seed that the loader hands the worker (itself drawn from the seeded main process), so runs repeat."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def unpack_targets(packed: torch.Tensor, n_classes: int = len(CLASSES)) -> torch.Tensor:
    """(B, H, W) packed uint8 -> (B, C, H, W) float 0/1 multi-label targets, on packed's device."""
    bits = torch.arange(n_classes, device=packed.device, dtype=torch.uint8).view(1, -1, 1, 1)
    return ((packed.unsqueeze(1) >> bits) & 1).float()


def multiclass_targets(packed: torch.Tensor, classes: tuple[str, ...] = CLASSES,
                       priority: tuple[str, ...] = MULTICLASS_PRIORITY) -> torch.Tensor:
    """(B, H, W) packed -> (B, H, W) long: 0 background, 1 + index in ``classes`` for an organ.

    Where organs overlap, the class that comes first in ``priority`` (utils.MULTICLASS_PRIORITY) wins."""
    out = torch.zeros(packed.shape, dtype=torch.long, device=packed.device)
    for name in reversed(priority):  # lowest priority first, higher ones overwrite
        c = classes.index(name)
        out = torch.where(((packed >> c) & 1).bool(), torch.full_like(out, c + 1), out)
    return out
