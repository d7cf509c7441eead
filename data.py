"""The Kaggle UW-Madison GI-tract layout: slice index, scan reading, case-level folds, 2.5D neighbours.

    <data_dir>/train.csv   id,class,segmentation   (three rows per slice; empty segmentation = no organ)
    <data_dir>/<split>/case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png

W is the width and H the height in pixels; arrays are (H, W). One index row per slice. The case-level folds and
the 2.5D neighbour table at the end serve every dataset (adapters.py): they need only ``case`` and the volume
columns.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rle import RLEError, decode_rle, parse_rle
from utils import UserError, read_csv_strings

GI_CLASSES: tuple[str, ...] = ("large_bowel", "small_bowel", "stomach")
# Overlap rule of --task multiclass: where organs overlap, the first class of this list wins.
GI_PRIORITY: tuple[str, ...] = ("stomach", "large_bowel", "small_bowel")

SCAN_RE = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)\.png$")
CASE_DAY_RE = re.compile(r"^case(\d+)_day(\d+)$")
CSV_COLUMNS = ("id", "class", "segmentation")


def parse_scan_path(path: Path) -> dict:
    """Slice metadata from ``.../case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png``."""
    m = SCAN_RE.match(path.name)
    caseday = CASE_DAY_RE.match(path.parent.parent.name)
    if m is None or caseday is None or path.parent.name != "scans":
        raise UserError(f"{path}: scan file name does not parse; expected "
                        "case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png")
    case, day = int(caseday.group(1)), int(caseday.group(2))
    sl, w, h = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if w < 1 or h < 1:
        raise UserError(f"{path}: width and height in the file name must be positive")
    return {"id": f"case{case}_day{day}_slice_{sl:04d}", "case": case, "day": day, "slice": sl, "width": w,
            "height": h, "spacing_x": float(m.group(4)), "spacing_y": float(m.group(5)), "path": str(path)}


def find_scans(data_dir: str | Path, split: str = "train") -> pd.DataFrame:
    """One row per scan file under ``<data_dir>/<split>``, sorted by case, day, slice."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data_dir {root} does not exist; pass --data_dir <folder with train.csv and train/>")
    scan_root = root / split
    if not scan_root.is_dir():
        raise UserError(f"{scan_root} not found: expected the scans under {split}/case<N>/case<N>_day<D>/scans/")
    files = sorted(scan_root.glob("case*/case*_day*/scans/*.png"))
    if not files:
        raise UserError(f"no scans found under {scan_root}/case*/case*_day*/scans/*.png")
    resolved_root = scan_root.resolve()
    rows = []
    for f in files:
        if not f.resolve().is_relative_to(resolved_root):  # a symlink may not lead out of the data folder
            raise UserError(f"{f}: scan path leads outside {scan_root}")
        rows.append(parse_scan_path(f))
    df = pd.DataFrame(rows)
    dup = df["id"].duplicated(keep=False)
    if dup.any():
        raise UserError(f"two scan files for slice {df.loc[dup, 'id'].iloc[0]}: {list(df.loc[dup, 'path'][:2])}")
    return df.sort_values(["case", "day", "slice"]).reset_index(drop=True)


def read_labels(csv_path: str | Path) -> pd.DataFrame:
    """train.csv as one row per slice id with one run-length column per class (empty string = no organ)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path} not found: the data folder needs the competition's train.csv")
    raw = read_csv_strings(csv_path, str(csv_path), "the header id,class,segmentation and three rows per slice")
    missing = [c for c in CSV_COLUMNS if c not in raw.columns]
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {missing}; expected columns {list(CSV_COLUMNS)}")
    unknown = sorted(set(raw["class"]) - set(GI_CLASSES))
    if unknown:
        row = int(raw.index[raw["class"].isin(unknown)][0]) + 2  # 1-based, after the header line
        raise UserError(f"{csv_path}: unknown class {unknown[0]!r} (line {row}); known classes: {list(GI_CLASSES)}")
    dup = raw.duplicated(["id", "class"], keep="first")
    if dup.any():
        row = int(raw.index[dup][0])
        raise UserError(f"{csv_path}: duplicate row for id {raw.at[row, 'id']!r}, class {raw.at[row, 'class']!r} "
                        f"(line {row + 2})")
    counts = raw.groupby("id").size()
    short = counts.index[counts < len(GI_CLASSES)]
    if len(short):
        have = set(raw.loc[raw["id"] == short[0], "class"])
        raise UserError(f"{csv_path}: {len(short)} id(s) lack a row for some class, e.g. {short[0]!r} has no "
                        f"{sorted(set(GI_CLASSES) - have)}; every id needs {len(GI_CLASSES)} rows ({', '.join(GI_CLASSES)}; "
                        "empty segmentation = organ absent), so a missing row is not read as 'absent'")
    wide = raw.pivot(index="id", columns="class", values="segmentation").reindex(columns=list(GI_CLASSES))
    return wide.fillna("").rename(columns={c: f"rle_{c}" for c in GI_CLASSES}).reset_index()


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


def build_index(data_dir: str | Path, split: str = "train", labels: bool = True) -> pd.DataFrame:
    """One row per slice: id, case, day, slice, width, height, spacing, path and (with labels) rle_<class>.

    Every labelled id must have a scan and every scan a label row; run-length codes are validated against the
    scan's own H x W here, so a bad code fails before training starts.
    """
    scans = find_scans(data_dir, split)
    if not labels:
        return scans
    csv_path = Path(data_dir) / "train.csv"
    lab = read_labels(csv_path)
    no_scan = sorted(set(lab["id"]) - set(scans["id"]))
    if no_scan:
        raise UserError(f"{csv_path}: {len(no_scan)} id(s) have no scan file, e.g. {no_scan[0]!r}; "
                        f"expected {Path(data_dir) / split}/case<N>/case<N>_day<D>/scans/slice_<SSSS>_*.png")
    no_rows = sorted(set(scans["id"]) - set(lab["id"]))
    if no_rows:
        raise UserError(f"{csv_path}: {len(no_rows)} scan(s) have no rows, e.g. {no_rows[0]!r}; "
                        "add its three rows (empty segmentation = no organ) or remove the scan")
    index = scans.merge(lab, on="id", how="left", validate="one_to_one")
    for row in index.itertuples():
        for c in GI_CLASSES:
            try:
                parse_rle(getattr(row, f"rle_{c}"), (row.height, row.width), where=f"{csv_path} id {row.id} class {c}")
            except RLEError as e:
                raise UserError(str(e)) from None
    return index


_warned_formats: set[str] = set()


def read_scan(path: str | Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Read a scan as a (H, W) array of its raw intensities (uint16 for the competition's 16-bit PNGs).

    8-bit and RGB scans are accepted with a one-time warning (RGB is converted to gray); a file that does not
    decode, or whose size disagrees with its file name, raises UserError.
    """
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: cannot decode the image (corrupt or truncated PNG?); re-copy the file")
    if img.ndim == 3:
        if "rgb" not in _warned_formats:
            warnings.warn(f"{path}: colour scan converted to gray (expected 16-bit grayscale); further ones silently",
                          stacklevel=2)
            _warned_formats.add("rgb")
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint8 and "8bit" not in _warned_formats:
        warnings.warn(f"{path}: 8-bit scan (expected 16-bit); intensities are normalised per slice so it still "
                      "works; further ones silently", stacklevel=2)
        _warned_formats.add("8bit")
    if (width is not None and img.shape[1] != width) or (height is not None and img.shape[0] != height):
        raise UserError(f"{path}: image is {img.shape[1]} wide x {img.shape[0]} high but its name says "
                        f"{width} x {height}")
    return img


def read_gi_masks(row) -> np.ndarray:
    """(3, H, W) uint8 organ masks of one labelled index row at the scan's size, each code decoded straight into
    its plane (no per-class mask)."""
    masks = np.zeros((len(GI_CLASSES), int(row.height), int(row.width)), np.uint8)
    for plane, c in zip(masks, GI_CLASSES):
        decode_rle(getattr(row, f"rle_{c}"), plane.shape, where=f"id {row.id} class {c}", out=plane)
    return masks


def case_folds(index: pd.DataFrame, n_folds: int, seed: int = 42) -> dict[int, int]:
    """Assign each case to a fold (GroupKFold-like): cases in a seeded order, largest first, each to the fold
    that has the fewest slices so far. Deterministic for a given index and seed; a case is in exactly one fold."""
    sizes = index.groupby("case").size()
    order = np.random.default_rng(seed).permutation(len(sizes))
    cases = sorted(zip(sizes.to_numpy()[order], sizes.index.to_numpy()[order]), key=lambda t: -t[0])
    load = np.zeros(n_folds, dtype=np.int64)
    fold_of = {}
    for n, case in cases:
        f = int(np.argmin(load))
        fold_of[int(case)] = f
        load[f] += n
    return fold_of


def check_fold(fold: int, n_folds: int) -> None:
    """The one check of --fold / --n_folds (the trainer calls it before any data work, predict.py through
    split_by_case)."""
    if n_folds < 2:
        raise UserError(f"--n_folds must be at least 2, got {n_folds}")
    if not 0 <= fold < n_folds:
        raise UserError(f"--fold must be in [0, {n_folds - 1}] for --n_folds {n_folds}, got {fold}")


def split_by_case(index: pd.DataFrame, fold: int, n_folds: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the training and validation slices of ``fold``; validation holds whole cases only."""
    check_fold(fold, n_folds)
    n_cases = index["case"].nunique()
    if n_cases < n_folds:
        raise UserError(f"only {n_cases} case(s) in the data but --n_folds {n_folds}: validation of some folds "
                        f"would be empty; use --n_folds {max(2, n_cases)} or less")
    fold_of = case_folds(index, n_folds, seed)
    is_val = index["case"].map(fold_of).to_numpy() == fold
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def neighbour_table(index: pd.DataFrame, context_slices: int = 1, stride: int = 2,
                    volume_columns: tuple[str, ...] = ("case", "day")) -> np.ndarray:
    """(N, context_slices) row positions of the slices stacked as channels for each slice.

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
    return out
