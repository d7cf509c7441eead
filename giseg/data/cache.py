"""Decode once: images and masks turned into arrays at the training resolution, on disk.

A cache folder holds ``images.npy`` (N, S, S) float16, each slice prepared as the model sees it
(preprocess.prepare_scan: normalised to [0, 1] and resized to S x S; a dataset of M image channels stores
(N * M, S, S), slice r's channel m at r * M + m), and ``masks.npy`` (N, S, S) uint8 whose
bit c is class c of the dataset adapter (masks.pack_masks), so classes that overlap stay overlapping at one byte
per pixel. Both are opened with ``np.load(mmap_mode="r")``: every data-loader worker shares the page cache
instead of a copy. ``manifest.json``, written last, lists each file's size and block checksums: a cache is used
only when its sizes match (always checked) and a sample of its blocks does (every block with ``verify=True``);
a damaged one is rebuilt with one log line. One process builds a cache at a time (a lock file beside it), after
checking the free space and reserving the files' blocks, so a full disk is an error message and not SIGBUS;
an interrupted build leaves nothing that a later one uses. The folder name is a hash of everything the arrays depend on (the adapter's fingerprint of
the index: slice ids, labels, file sizes and times; the size, the preprocessing version), so a change of any of
them builds a new cache. Full competition data (38,496 slices) at 288 px: 38,496 * 288 * 288 * (2 + 1) bytes
= 9.6 GB.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter
from giseg.data.preprocess import BODY_THRESHOLD, body_box, crop_box, normalise_scan, prepare_scan, resize_mask
from giseg.utils.errors import UserError, human_bytes
from giseg.utils.exits import StopSignals, Stopped
from giseg.utils.files import atomic_dir, recover_replaced
from giseg.utils.locks import FolderLock
from giseg.utils.log import logger

CACHE_VERSION = 2  # bump when the preprocessing below changes
MANIFEST = "manifest.json"
BLOCKS = 64  # checksummed blocks per file
SAMPLED_BLOCKS = 4  # of them checked at every open (first, last and two more)


@dataclass
class SliceCache:
    images: np.ndarray  # (N, S, S) float16 in [0, 1]
    masks: np.ndarray  # (N, S, S) uint8, bit c = class c
    path: Path
    boxes: np.ndarray | None = None  # --body_crop: (N, 4) int32 (y0, y1, x0, x1) of each slice's crop, at its size


def cache_key(adapter: DatasetAdapter, index: pd.DataFrame, image_size: int, crop_margin: int | None = None) -> str:
    what = {"version": CACHE_VERSION, "size": image_size, "dataset": adapter.name, "classes": adapter.classes}
    if crop_margin is not None:  # (an uncropped cache keeps the key it always had)
        what["body_crop"] = {"margin": crop_margin, "threshold": BODY_THRESHOLD}
    h = hashlib.sha256(json.dumps(what).encode())
    h.update(adapter.fingerprint(index).encode())
    return h.hexdigest()[:16]


def _block_size(size: int) -> int:
    return max(1 << 20, -(-size // BLOCKS))


def _checksums(path: Path, blocks: list[int] | None = None) -> dict[int, int]:
    """crc32 of the file's blocks (all, or the numbers in ``blocks``)."""
    size = path.stat().st_size
    step = _block_size(size)
    wanted = range(-(-size // step)) if blocks is None else blocks
    out = {}
    with open(path, "rb") as f:
        for b in wanted:
            f.seek(b * step)
            out[b] = zlib.crc32(f.read(step))
    return out


def write_manifest(folder: Path) -> None:
    files = {f.name: {"size": f.stat().st_size, "crc32": list(_checksums(f).values())}
             for f in sorted(folder.iterdir()) if f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"version": CACHE_VERSION, "files": files}) + "\n")


def check_cache(folder: Path, verify: bool = False) -> str | None:
    """None when the cache in ``folder`` is whole, else what is wrong (one phrase). Sizes are always checked,
    the checksums of a few blocks per file too; ``verify`` checks every block."""
    if not folder.exists():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (unfinished build, or written by an older version)"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return f"{name} is {path.stat().st_size if path.is_file() else 'missing'}, not {meta['size']} bytes"
        n = len(meta["crc32"])
        blocks = None if verify else sorted({0, n - 1, n // 3, (2 * n) // 3})[:SAMPLED_BLOCKS]
        for b, crc in _checksums(path, blocks).items():
            if crc != meta["crc32"][b]:
                return f"{name} block {b} of {n} does not match its checksum"
    return None


def _reserve(path: Path, size: int) -> None:
    """Allocate the file's blocks now: a full disk raises ENOSPC here instead of SIGBUS on a memory-mapped write."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def first_channel(raw: np.ndarray, channels: int) -> np.ndarray:
    return raw if channels == 1 else raw[0]


def volume_box(scans: list[np.ndarray], margin: int) -> list[tuple[int, int, int, int]]:
    """--body_crop: one volume's crop box for each of its slices ([0, 1] scans of the first image channel): the
    union of their body boxes (preprocess.body_box), grown by ``margin`` and squared (crop_box) on each slice's
    size. One box per volume keeps 2.5D neighbours aligned."""
    bodies = np.array([body_box(scan) for scan in scans])
    union = (int(bodies[:, 0].min()), int(bodies[:, 1].max()), int(bodies[:, 2].min()), int(bodies[:, 3].max()))
    return [crop_box(union, scan.shape, margin) for scan in scans]


def work_units(adapter: DatasetAdapter, index: pd.DataFrame, crop: bool, window: int) -> list[np.ndarray]:
    """The row positions the build decodes together: windows of ``window`` rows, or with a crop each volume's rows
    (its box needs all of them); the memory of a build grows with a unit, not with the dataset."""
    if not crop:
        return [np.arange(s, min(s + window, len(index))) for s in range(0, len(index), window)]
    groups = index.groupby([index[c].to_numpy() for c in adapter.volume_columns], sort=False).indices
    return [np.sort(rows) for rows in groups.values()]


def _build(adapter: DatasetAdapter, index: pd.DataFrame, image_size: int, folder: Path, num_threads: int,
           crop_margin: int | None = None) -> None:
    labelled = adapter.has_labels(index)
    channels = adapter.channels
    need = len(index) * image_size * image_size * (2 * channels + 1) + 64 * len(index) + (1 << 20)
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        raise UserError(f"--cache_dir {folder.parent}: the cache of {len(index)} slices at {image_size}px needs "
                        f"{human_bytes(need)} but only {human_bytes(free)} are free; free space or pass a --cache_dir "
                        "on a larger disk")

    tuples = list(index.itertuples())  # (once: a row's own lookup costs more than its decode on small slices)

    def decode(i: int) -> np.ndarray:
        row = tuples[i]
        raw = adapter.read_image(row)
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():  # (it would surface as a NaN loss, much later)
            raise UserError(f"{getattr(row, 'path', row.id)} (id {row.id}): the image holds NaN or infinite values; "
                            "fix or drop that image")
        return raw

    def prepare(i: int, raw: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        crop = (slice(None), slice(None)) if box is None else (slice(box[0], box[1]), slice(box[2], box[3]))
        image = prepare_scan(raw, image_size, crop) if channels == 1 else np.stack(
            [prepare_scan(c, image_size, crop) for c in raw])
        if not labelled:
            return image, np.zeros((image_size, image_size), np.uint8)
        packed = adapter.read_packed(tuples[i])
        return image, resize_mask(np.ascontiguousarray(packed[crop]), image_size)

    logger.info("building decode-once cache for %d slices at %dpx in %s", len(index), image_size, folder)
    try:
        _write_cache(index, folder, channels, image_size, crop_margin, num_threads, decode, prepare, adapter)
    except Stopped as e:  # (atomic_dir removed the unfinished folder on the way out)
        raise Stopped(e.signum, f"the cache build of {folder.name} was stopped and its unfinished folder removed; "
                                "the next run builds it again") from None
    logger.info("cache ready: %.1f MB", sum(f.stat().st_size for f in folder.iterdir()) / 1e6)


def _write_cache(index, folder: Path, channels: int, image_size: int, crop_margin, num_threads: int,
                 decode, prepare, adapter) -> None:
    """The cache's files, written into a temporary folder that lands as ``folder`` only when complete."""
    shape = (len(index), image_size, image_size)
    with StopSignals(), atomic_dir(folder) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16,
                                           (len(index) * channels, image_size, image_size))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, shape)
        for name in ("images.npy", "masks.npy"):
            _reserve(tmp / name, (tmp / name).stat().st_size)
        boxes = np.zeros((len(index), 4), np.int32) if crop_margin is not None else None
        threads = max(1, num_threads)
        with ThreadPoolExecutor(threads) as pool:  # cv2 and numpy release the GIL
            for rows in work_units(adapter, index, boxes is not None, 16 * threads):
                raws = list(pool.map(decode, rows))  # each image decoded once
                unit_boxes = [None] * len(rows)
                if boxes is not None:
                    scans = list(pool.map(lambda raw: normalise_scan(first_channel(raw, channels)), raws))
                    unit_boxes = volume_box(scans, crop_margin)
                    boxes[rows] = unit_boxes
                for i, (im, m) in zip(rows, pool.map(prepare, rows, raws, unit_boxes)):
                    images[i * channels:(i + 1) * channels], masks[i] = im, m
        if boxes is not None:
            np.save(tmp / "boxes.npy", boxes)
        images.flush()
        masks.flush()
        del images, masks
        (tmp / "ids.txt").write_text("\n".join(index["id"]) + "\n")
        write_manifest(tmp)  # last: a folder without it is never used


def build_cache(adapter: DatasetAdapter, index: pd.DataFrame, image_size: int, cache_root: str | Path,
                num_threads: int = 4, verify: bool = False, crop_margin: int | None = None) -> SliceCache:
    """Open the cache of ``index`` at ``image_size`` under ``cache_root``, building it first if it is missing or
    damaged (``verify``: check every block's checksum, not a sample). An index without labels (a test layout)
    gets empty masks. ``crop_margin`` (--body_crop): each slice cropped to its volume's body box first (boxes.npy
    keeps the boxes, to paste predictions back at original size)."""
    root = Path(cache_root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--cache_dir {root} is a file; pass a folder")
    crop = "" if crop_margin is None else f"crop{crop_margin}-"
    folder = root / f"{image_size}px-{crop}{len(index)}-{cache_key(adapter, index, image_size, crop_margin)}"
    problem = check_cache(folder, verify)
    if problem is not None:
        with FolderLock(root / f".{folder.name}.lock"):  # one builder; the others wait and then use its cache
            recover_replaced(root, folder.name)  # leftovers of a killed build (safe: we hold the lock)
            problem = check_cache(folder, verify)
            if problem is not None:
                if problem != "missing":
                    logger.warning("cache %s is damaged (%s): rebuilding it", folder, problem)
                _build(adapter, index, image_size, folder, num_threads, crop_margin)
    try:  # its last use, for giseg cache --unused_days (a read-only shared cache stays as it is)
        os.utime(folder / MANIFEST)
    except OSError:
        pass
    cache = SliceCache(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r"),
                       folder, np.load(folder / "boxes.npy") if crop_margin is not None else None)
    want = (len(index), image_size, image_size)
    if cache.images.shape != (len(index) * adapter.channels, *want[1:]) or cache.masks.shape != want:
        raise UserError(f"cache {folder} holds arrays of shape {cache.images.shape}, not ({len(index)}, {image_size}, "
                        f"{image_size}); delete the folder and run again")
    return cache
