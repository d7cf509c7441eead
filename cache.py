"""Decode once: scans and run-length codes turned into arrays at the training resolution, on disk.

A cache folder holds ``images.npy`` (N, S, S) float16, each slice normalised to [0, 1] (data.normalise_scan)
and resized to S x S, and ``masks.npy`` (N, S, S) uint8 whose bit c is class c of utils.CLASSES, so organs
that overlap stay overlapping at one byte per pixel. Both are opened with ``np.load(mmap_mode="r")``: every
data-loader worker shares the page cache instead of a copy. The folder name is a hash of everything the
arrays depend on (slice ids, file sizes and times, run-length codes, size, preprocessing version), so a
change of any of them builds a new cache. Full competition data (38,496 slices) at 288 px:
38,496 * 288 * 288 * (2 + 1) bytes = 9.6 GB.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data import has_labels, normalise_scan, read_scan
from lgg import read_lgg_mask, read_lgg_scan
from rle import decode_rle
from utils import CLASSES, atomic_dir, logger

CACHE_VERSION = 1  # bump when the preprocessing below changes


@dataclass
class SliceCache:
    images: np.ndarray  # (N, S, S) float16 in [0, 1]
    masks: np.ndarray  # (N, S, S) uint8, bit c = class c
    path: Path


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) float image to (size, size): area averaging when shrinking, bilinear when growing."""
    interp = cv2.INTER_AREA if img.shape[0] > size and img.shape[1] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) integer mask to (size, size) with nearest neighbour (keeps packed class bits intact)."""
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(C, H, W) 0/1 masks -> (H, W) uint8 with bit c set where class c is present."""
    bits = (1 << np.arange(masks.shape[0], dtype=np.uint8))[:, None, None]
    return (masks.astype(np.uint8) * bits).sum(axis=0, dtype=np.uint8)


def unpack_masks(packed: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """(..., H, W) packed uint8 -> (..., C, H, W) uint8 0/1."""
    bits = np.arange(n_classes, dtype=np.uint8)[:, None, None]
    return (packed[..., None, :, :] >> bits) & 1


def slice_masks(row, with_labels: bool = True) -> np.ndarray:
    """(C, H, W) uint8 masks of one index row at the scan's original size (run-length codes of the GI data, or
    the mask file of the LGG data)."""
    shape = (int(row.height), int(row.width))
    mask_path = getattr(row, "mask_path", None)
    if isinstance(mask_path, str):
        return read_lgg_mask(mask_path)
    masks = np.zeros((len(CLASSES), *shape), np.uint8)
    if with_labels:
        for plane, c in zip(masks, CLASSES):  # each code decoded straight into its plane: no per-class mask
            decode_rle(getattr(row, f"rle_{c}"), shape, where=f"id {row.id} class {c}", out=plane)
    return masks


def cache_key(index: pd.DataFrame, image_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "size": image_size, "classes": CLASSES}).encode())
    paths = list(index["path"]) + (list(index["mask_path"]) if "mask_path" in index else [])
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for c in CLASSES:
        col = f"rle_{c}"
        if col in index:
            h.update("\n".join(index[col].astype(str)).encode())
    return h.hexdigest()[:16]


def _load_one(row, image_size: int, with_labels: bool) -> tuple[np.ndarray, np.ndarray]:
    reader = read_lgg_scan if isinstance(getattr(row, "mask_path", None), str) else read_scan
    img = reader(row.path, row.width, row.height)
    image = resize_image(normalise_scan(img), image_size).astype(np.float16)
    mask = resize_mask(pack_masks(slice_masks(row, with_labels)), image_size)
    return image, mask


def build_cache(index: pd.DataFrame, image_size: int, cache_root: str | Path, num_threads: int = 4) -> SliceCache:
    """Open the cache for ``index`` at ``image_size`` under ``cache_root``, building it first if needed."""
    with_labels = has_labels(index)
    folder = Path(cache_root) / f"{image_size}px-{len(index)}-{cache_key(index, image_size)}"
    if not (folder / "masks.npy").exists():
        logger.info("building decode-once cache for %d slices at %dpx in %s", len(index), image_size, folder)
        with atomic_dir(folder) as tmp:
            images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, (len(index), image_size, image_size))
            masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (len(index), image_size, image_size))
            rows = list(index.itertuples())
            with ThreadPoolExecutor(max(1, num_threads)) as pool:  # cv2 and numpy release the GIL
                for i, (im, m) in enumerate(pool.map(lambda r: _load_one(r, image_size, with_labels), rows)):
                    images[i], masks[i] = im, m
            images.flush()
            masks.flush()
            del images, masks
            (tmp / "ids.txt").write_text("\n".join(index["id"]) + "\n")
        logger.info("cache ready: %.1f MB", sum(f.stat().st_size for f in folder.iterdir()) / 1e6)
    cache = SliceCache(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r"), folder)
    if cache.images.shape[0] != len(index):
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"cache {folder} did not match the index; it was removed, run again")
    return cache
