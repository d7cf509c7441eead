"""Decode once: images and masks turned into arrays at the training resolution, on disk.

A cache folder holds ``images.npy`` (N, S, S) float16, each slice prepared as the model sees it
(preprocess.prepare_scan: normalised to [0, 1] and resized to S x S), and ``masks.npy`` (N, S, S) uint8 whose
bit c is class c of the dataset adapter (masks.pack_masks), so classes that overlap stay overlapping at one byte
per pixel. Both are opened with ``np.load(mmap_mode="r")``: every data-loader worker shares the page cache
instead of a copy. The folder name is a hash of everything the arrays depend on (the adapter's fingerprint of
the index: slice ids, labels, file sizes and times; the size, the preprocessing version), so a change of any of
them builds a new cache. Full competition data (38,496 slices) at 288 px: 38,496 * 288 * 288 * (2 + 1) bytes
= 9.6 GB.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adapters import DatasetAdapter
from masks import pack_masks
from preprocess import prepare_scan, resize_mask
from utils import atomic_dir, logger

CACHE_VERSION = 2  # bump when the preprocessing below changes


@dataclass
class SliceCache:
    images: np.ndarray  # (N, S, S) float16 in [0, 1]
    masks: np.ndarray  # (N, S, S) uint8, bit c = class c
    path: Path


def cache_key(adapter: DatasetAdapter, index: pd.DataFrame, image_size: int) -> str:
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "size": image_size, "dataset": adapter.name,
                                   "classes": adapter.classes}).encode())
    h.update(adapter.fingerprint(index).encode())
    return h.hexdigest()[:16]


def build_cache(adapter: DatasetAdapter, index: pd.DataFrame, image_size: int, cache_root: str | Path,
                num_threads: int = 4) -> SliceCache:
    """Open the cache of ``index`` at ``image_size`` under ``cache_root``, building it first if needed.
    An index without labels (a test layout) gets empty masks."""
    labelled = adapter.has_labels(index)
    folder = Path(cache_root) / f"{image_size}px-{len(index)}-{cache_key(adapter, index, image_size)}"

    def load_one(row) -> tuple[np.ndarray, np.ndarray]:
        image = prepare_scan(adapter.read_image(row), image_size)
        if not labelled:
            return image, np.zeros((image_size, image_size), np.uint8)
        return image, resize_mask(pack_masks(adapter.read_masks(row)), image_size)

    if not (folder / "masks.npy").exists():
        logger.info("building decode-once cache for %d slices at %dpx in %s", len(index), image_size, folder)
        with atomic_dir(folder) as tmp:
            shape = (len(index), image_size, image_size)
            images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, shape)
            masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, shape)
            with ThreadPoolExecutor(max(1, num_threads)) as pool:  # cv2 and numpy release the GIL
                for i, (im, m) in enumerate(pool.map(load_one, index.itertuples())):
                    images[i], masks[i] = im, m
            images.flush()
            masks.flush()
            del images, masks
            (tmp / "ids.txt").write_text("\n".join(index["id"]) + "\n")
        logger.info("cache ready: %.1f MB", sum(f.stat().st_size for f in folder.iterdir()) / 1e6)
    cache = SliceCache(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r"),
                       folder)
    if cache.images.shape[0] != len(index):
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"cache {folder} did not match the index; it was removed, run again")
    return cache
