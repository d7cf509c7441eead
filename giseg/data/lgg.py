"""The LGG brain-MRI dataset of the U-Net reports (Kaggle "lgg-mri-segmentation"), selected with --dataset lgg.

    <data_dir>/<patient>/<patient>_<k>.tif        RGB 256x256 scan: pre-contrast, FLAIR, post-contrast
    <data_dir>/<patient>/<patient>_<k>_mask.tif   binary tumour mask (0 / 255)

<data_dir> is the `kaggle_3m` folder. One index row per slice; a patient is a "case" (folds split by patient) with
a single volume (day 0) whose slices are ordered by <k>. The model sees the FLAIR channel, on which the masks were
drawn, as the GI scans are seen: one channel repeated, or --context_slices 3 neighbours. One class, `tumor`.

    giseg demo-data --dataset lgg --out demo/lgg        # a small generated folder in this layout
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter, hash_files
from giseg.utils.errors import UserError

LGG_CLASSES: tuple[str, ...] = ("tumor",)
FLAIR = 1  # channel index of FLAIR in the RGB tif (cv2 reads BGR; G stays at index 1)
SLICE_RE = re.compile(r"^(?P<patient>.+)_(?P<k>\d+)\.tif$")


def build_lgg_index(data_dir: str | Path) -> pd.DataFrame:
    """One row per slice: id, patient, case (a number per patient), day 0, slice, width, height, path, mask_path."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data_dir {root} does not exist; pass --data_dir <the kaggle_3m folder>")
    rows = []
    for mask in sorted(root.glob("*/*_mask.tif")):
        scan = mask.with_name(mask.name.replace("_mask.tif", ".tif"))
        m = SLICE_RE.match(scan.name)
        if m is None:
            raise UserError(f"{mask}: name does not parse; expected <patient>/<patient>_<k>_mask.tif")
        if not scan.is_file():
            raise UserError(f"{mask}: its scan {scan.name} is missing")
        rows.append({"id": scan.stem, "patient": mask.parent.name, "day": 0, "slice": int(m.group("k")),
                     "path": str(scan), "mask_path": str(mask)})
    if not rows:
        raise UserError(f"no <patient>/<name>_mask.tif files under {root}; pass the kaggle_3m folder as --data_dir")
    df = pd.DataFrame(rows)
    df["case"] = df["patient"].astype("category").cat.codes.astype(int)
    first = cv2.imread(df["path"].iloc[0], cv2.IMREAD_UNCHANGED)
    if first is None:
        raise UserError(f"{df['path'].iloc[0]}: cannot decode the image")
    df["height"], df["width"] = first.shape[0], first.shape[1]  # the dataset's scans are all 256x256; checked on read
    df["spacing_x"] = df["spacing_y"] = np.nan
    return df.sort_values(["case", "slice"]).reset_index(drop=True)


def read_lgg_scan(path: str | Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The FLAIR channel of an LGG scan as (H, W)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: cannot decode the image (corrupt or truncated TIFF?)")
    img = img[..., FLAIR] if img.ndim == 3 else img
    if (width is not None and img.shape[1] != width) or (height is not None and img.shape[0] != height):
        raise UserError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected {width}x{height} like the rest")
    return img


def read_lgg_mask(path: str | Path) -> np.ndarray:
    """(1, H, W) uint8 0/1 tumour mask."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise UserError(f"{path}: cannot decode the mask")
    return (m > 0).astype(np.uint8)[None]


def make_lgg_demo(out_dir: str | Path, n_patients: int = 5, slices: int = 12, size: int = 256, seed: int = 0) -> Path:
    """A small deterministic folder in the LGG layout: a head with a bright FLAIR blob (the tumour) in the middle
    slices of each patient."""
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("*/*_mask.tif")):
        return out
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for p in range(n_patients):
        rng = np.random.default_rng([seed, p])
        patient = f"TCGA_DEMO_{p:04d}_2000{p + 1:02d}01"
        (out / patient).mkdir(parents=True, exist_ok=True)
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        for k in range(1, slices + 1):
            z = k / (slices + 1)
            head = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.36 * size)) ** 2 <= 1
            r = 0.12 * size * max(0.0, np.sin(np.pi * (z - 0.25) / 0.5)) if 0.25 < z < 0.75 else 0.0
            tumour = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & head
            rgb = np.zeros((size, size, 3), np.float32)
            for c, level in enumerate((90, 110, 100)):
                rgb[..., c] = np.where(head, level + rng.normal(0, 12, (size, size)), rng.normal(5, 3, (size, size)))
            rgb[..., FLAIR][tumour] = 220 + rng.normal(0, 10, int(tumour.sum()))
            cv2.imwrite(str(out / patient / f"{patient}_{k}.tif"), np.clip(rgb, 0, 255).astype(np.uint8))
            cv2.imwrite(str(out / patient / f"{patient}_{k}_mask.tif"), (tumour * 255).astype(np.uint8))
    return out


class LGGAdapter(DatasetAdapter):
    name = "lgg"
    description = "LGG brain MRI (one class, tumor; the kaggle_3m folder; see py)"
    classes = LGG_CLASSES
    priority = LGG_CLASSES
    colours = {"tumor": "yellow"}
    title = "LGG brain MRI segmentation (kaggle_3m)"
    limits = "brain MRI (FLAIR, the LGG collection's kaggle_3m slices) and one class only: tumor."
    volume_columns = ("case",)

    def build_index(self, data_dir, split=None, require_labels=True):
        return build_lgg_index(data_dir)

    def read_image(self, row):
        return read_lgg_scan(row.path, row.width, row.height)

    def read_masks(self, row):
        return read_lgg_mask(row.mask_path)

    def make_demo(self, out_dir):
        return make_lgg_demo(out_dir)

    def fingerprint(self, index):
        return hash_files(hashlib.sha256(super().fingerprint(index).encode()), index["mask_path"])

    def read_upload(self, path):
        return read_lgg_scan(path), None
