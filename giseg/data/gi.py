"""The Kaggle UW-Madison GI-tract layout (``--dataset gi``): slice index, run-length masks, and its adapter.

    <data_dir>/train.csv   id,class,segmentation   (three rows per slice; empty segmentation = no organ)
    <data_dir>/<split>/case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png

W is the width and H the height in pixels; arrays are (H, W). One index row per slice. The case-level folds
(folds.py) and the 2.5D neighbour table (volumes.py) serve every dataset: they need only ``case`` and the volume
columns.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter, read_scan
from giseg.data.demo import make_demo_data
from giseg.data.rle import RLEError, decode_rle, parse_rle
from giseg.utils.errors import UserError
from giseg.utils.files import read_csv_strings

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


def read_gi_masks(row) -> np.ndarray:
    """(3, H, W) uint8 organ masks of one labelled index row at the scan's size, each code decoded straight into
    its plane (no per-class mask)."""
    masks = np.zeros((len(GI_CLASSES), int(row.height), int(row.width)), np.uint8)
    for plane, c in zip(masks, GI_CLASSES):
        decode_rle(getattr(row, f"rle_{c}"), plane.shape, where=f"id {row.id} class {c}", out=plane)
    return masks


class GIAdapter(DatasetAdapter):
    name = "gi"
    description = "UW-Madison GI tract (3 organs; Kaggle layout with train.csv + train/)"
    classes = GI_CLASSES
    priority = GI_PRIORITY
    colours = {"large_bowel": "red", "small_bowel": "green", "stomach": "blue"}
    title = "UW-Madison GI Tract Image Segmentation"
    limits = ("MRI of the abdomen (UW-Madison GI tract: MR-Linac scans of the abdomen, axial slices) and these "
              "three organs only: large bowel, small bowel, stomach.")

    def build_index(self, data_dir, split=None, require_labels=True):
        split = split or "train"
        labels = require_labels or (split == "train" and (Path(data_dir) / "train.csv").is_file())
        return build_index(data_dir, split, labels=labels)

    def read_image(self, row):
        return read_scan(row.path, row.width, row.height)

    def read_masks(self, row):
        return read_gi_masks(row)

    def make_demo(self, out_dir):
        return make_demo_data(out_dir)

    def has_labels(self, index):
        return f"rle_{self.classes[0]}" in index

    def without_labels(self, index):  # the run-length codes: 1.6 kB a slice, 63 MB at the competition's size
        return index.drop(columns=[f"rle_{c}" for c in self.classes if f"rle_{c}" in index])

    def presence(self, index):
        return pd.DataFrame({c: index[f"rle_{c}"].astype(str).str.len() > 0 for c in self.classes})

    def inference_split(self, data_dir):
        return "test" if (Path(data_dir) / "test").is_dir() else "train"

    def read_upload(self, path):
        m = SCAN_RE.match(Path(path).name)
        return read_scan(path), ((float(m.group(4)), float(m.group(5))) if m else None)

    def pixel_spacing(self, row):
        return float(row.spacing_x), float(row.spacing_y)
