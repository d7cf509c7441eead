"""The slices of an nnU-Net raw dataset: its cases and channel files, checked against each other (shapes,
affines), as our index of slices."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.nnunet.dataset_json import DATASET_JSON, ENDING, SPLITS, channel_names
from giseg.data.nifti import header_of, in_plane, through_plane_axis
from giseg.utils.errors import UserError


AFFINE_TOLERANCE = 1e-3  # mm: a label's affine may differ from its image's by rounding, not by a voxel


def channel_path(path: str | Path, m: int) -> Path:
    """Channel ``m``'s file of the case whose channel-0 file is ``path`` (<case>_0000<ending>)."""
    path = Path(path)
    stem, _, ending = path.name.rpartition("_0000.")
    return path.with_name(f"{stem}_{m:04d}.{ending}")


def case_names(folder: Path, ending: str) -> list[str]:
    return sorted(f.name[:-len("_0000" + ending)] for f in folder.glob(f"*_0000{ending}"))


def case_numbers(names: list[str], pattern: str | None, where: str) -> tuple[list[int], list[int]]:
    """(case, day) of each file's case name: by ``pattern`` (groups case and day), else one case per file."""
    if pattern is None:
        return list(range(len(names))), [0] * len(names)
    rx = re.compile(pattern)
    found = [rx.fullmatch(n) for n in names]
    if None in found:
        raise UserError(f'{where}: "case_pattern" {pattern!r} does not match the case {names[found.index(None)]!r}')
    cases = [m.group("case") for m in found]
    days = [m.group("day") if "day" in rx.groupindex and m.group("day") else "0" for m in found]
    bad = next((n for n, d in zip(names, days) if not d.isdigit()), None)
    if bad is not None:
        raise UserError(f'{where}: "case_pattern" {pattern!r} gives the case {bad!r} the day '
                        f"{days[names.index(bad)]!r}; the day group must match digits, e.g. (?P<day>\\d+)")
    days = [int(d) for d in days]
    if all(c.isdigit() for c in cases):
        return [int(c) for c in cases], days
    order = {c: i for i, c in enumerate(sorted(set(cases)))}
    return [order[c] for c in cases], days


def build_nnunet_index(root: Path, meta: dict, split: str, require_labels: bool) -> pd.DataFrame:
    """One row per slice of every volume under ``root/<split>``: id, case, day, slice, width, height, spacing_x/y/z,
    axis, path and (labelled) label_path. Headers only: shapes and affines are checked before any voxel is read."""
    ending = meta.get("file_ending", ENDING)
    folder = root / SPLITS.get(split, split)
    if not folder.is_dir():
        raise UserError(f"{folder} not found: an nnU-Net dataset keeps its scans in imagesTr/ (and imagesTs/)")
    names = case_names(folder, ending)
    if not names:
        raise UserError(f"no <case>_0000{ending} files in {folder} (dataset.json's file_ending is {ending!r})")
    labels_dir = root / ("labelsTr" if folder.name == "imagesTr" else folder.name.replace("images", "labels"))
    # labels are read when training asks for them, or when every case has its own (scoring, tuning)
    labelled = require_labels or all((labels_dir / f"{n}{ending}").is_file() for n in names)
    cases, days = case_numbers(names, meta.get("case_pattern"), str(root / DATASET_JSON))
    rows = []
    n_channels = len(channel_names(meta))
    for name, case, day in zip(names, cases, days):
        image = folder / f"{name}_0000{ending}"
        shape, affine, spacing = header_of(image)
        for m in range(1, n_channels):
            other = channel_path(image, m)
            if not other.is_file():
                raise UserError(f"{image}: its channel {m} file {other.name} is missing (dataset.json names "
                                f"{n_channels} channels)")
            oshape, oaffine, _ = header_of(other)
            if oshape != shape or not np.allclose(oaffine, affine, atol=AFFINE_TOLERANCE):
                raise UserError(f"{other}: channel {m} is not on the grid of {image.name} (shape {oshape} vs {shape}, "
                                "or another affine); the channels of a case must match voxel for voxel")
        label = labels_dir / f"{name}{ending}"
        if labelled:
            if not label.is_file():
                raise UserError(f"{image}: no label map {label}; a training case needs its labels (predicting on "
                                "unlabelled scans needs none: giseg predict)")
            lshape, laffine, _ = header_of(label)
            if lshape != shape:
                raise UserError(f"{label}: label map of shape {lshape}, its image {image.name} {shape}; they must "
                                "match voxel for voxel")
            if not np.allclose(laffine, affine, atol=AFFINE_TOLERANCE):
                raise UserError(f"{label}: its affine differs from its image's ({image.name}) by up to "
                                f"{np.abs(laffine - affine).max():.4g} mm; the label map must lie on the image's grid "
                                "(resample it onto the image)")
        axis = meta.get("slice_axis", through_plane_axis(spacing))
        p, q = in_plane(axis)
        for k in range(shape[axis]):
            rows.append({"id": f"{name}_slice_{k + 1:04d}", "case": case, "day": day, "slice": k + 1,
                         "width": shape[p], "height": shape[q], "spacing_x": spacing[p], "spacing_y": spacing[q],
                         "spacing_z": spacing[axis], "axis": axis, "case_name": name, "path": str(image),
                         **({"label_path": str(label)} if labelled else {})})
    index = pd.DataFrame(rows)
    dup = index.duplicated(["case", "day", "slice"])
    if dup.any():
        first = index.loc[dup, "case_name"].iloc[0]
        raise UserError(f'{root / DATASET_JSON}: "case_pattern" gives {first!r} the same case and day as another file; '
                        "add a day group, or drop the pattern")
    return index.sort_values(["case", "day", "slice"], kind="stable").reset_index(drop=True)
