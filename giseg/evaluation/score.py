"""Score a submission (id,class,predicted run-length codes) against the ground truth of a data folder.

    giseg score --pred submission.csv --data_dir <folder with train.csv> [--json scores.json]

Figures, overall and per case: per-slice Dice per class and mean (the --empty_dice rule for empty/empty pairs),
global (pooled) Dice, IoU, 3D Hausdorff per volume (GI: a case-day; metrics.hausdorff_3d: per class, then the
mean over the volume-class pairs where either mask is non-empty; `hausdorff_merged` uses the union of the
classes), the competition score 0.4 * dice_mean + 0.6 * (1 - hausdorff), and "time saved": per class, the share
of slices showing the class whose Dice clears --time_saved_threshold. Only the volumes present in the submission
are scored, and each of them must be complete. The ground truth, the classes and the volumes come from the
--dataset adapter.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter
from giseg.data.rle import RLEError, decode_rle
from giseg.data.volumes import check_volume_sizes
from giseg.evaluation.metrics import (
    EMPTY_RULES,
    competition_score,
    dice_from_stats,
    hausdorff_3d,
    hausdorff_mm,
    mask_stats,
    summarise,
    time_saved,
)
from giseg.utils.errors import UserError
from giseg.utils.files import read_csv_strings

SUBMISSION_COLUMNS = ("id", "class", "predicted")


def read_submission(path: str | Path, classes: tuple[str, ...]) -> pd.DataFrame:
    """A submission as one row per id with a ``pred_<class>`` run-length column per class."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"submission {path} not found")
    df = read_csv_strings(path, f"submission {path}", "the header id,class,predicted and a row per slice and class")
    wide = submission_to_wide(df, str(path), classes=classes)
    if wide.empty:
        raise UserError(f"submission {path} has a header but no rows; nothing to score")
    return wide


def submission_to_wide(df: pd.DataFrame, path: str = "submission", *, classes: tuple[str, ...]) -> pd.DataFrame:
    """Validate long submission rows (id, class, predicted) and pivot them to id + pred_<class>."""
    missing = [c for c in SUBMISSION_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected {list(SUBMISSION_COLUMNS)}")
    unknown = sorted(set(df["class"]) - set(classes))
    if unknown:
        raise UserError(f"{path}: unknown class {unknown[0]!r}; known classes: {list(classes)}")
    dup = df.duplicated(["id", "class"])
    if dup.any():
        raise UserError(f"{path}: duplicate row for id {df.loc[dup, 'id'].iloc[0]!r}, class {df.loc[dup, 'class'].iloc[0]!r}")
    counts = df.groupby("id").size()
    if (counts != len(classes)).any():
        raise UserError(f"{path}: id {counts.index[counts != len(classes)][0]!r} lacks a row for some class; "
                        f"each id needs {len(classes)} rows ({', '.join(classes)})")
    wide = df.pivot(index="id", columns="class", values="predicted").reindex(columns=list(classes))
    return wide.rename(columns={c: f"pred_{c}" for c in classes}).reset_index()


def _align(index: pd.DataFrame, pred: pd.DataFrame, source: str, volume: list[str]) -> pd.DataFrame:
    extra = sorted(set(pred["id"]) - set(index["id"]))
    if extra:
        raise UserError(f"{source}: {len(extra)} id(s) not in the ground truth, e.g. {extra[0]!r}")
    keys = pd.MultiIndex.from_frame(index[volume])
    wanted = index[keys.isin(keys[index["id"].isin(set(pred["id"]))])]
    missing = sorted(set(wanted["id"]) - set(pred["id"]))
    if missing:
        raise UserError(f"{source}: {len(missing)} slice(s) of the scored volumes have no prediction, e.g. "
                        f"{missing[0]!r}; 3D Hausdorff needs whole volumes")
    return wanted.merge(pred, on="id", how="left").sort_values([*volume, "slice"]).reset_index(drop=True)


def figures_from_stats(stats: np.ndarray, hd: np.ndarray, hd_merged: np.ndarray, empty: str, threshold: float,
             classes: tuple[str, ...], hd_mm: np.ndarray | None = None) -> dict:
    out = summarise(stats, empty, classes)
    if hd_mm is not None:  # (volumes, classes) in mm, NaN where either mask is empty
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (a class never found in both: its mean is NaN)
            for c, name in enumerate(classes):
                out[f"hausdorff_mm_{name}"] = float(np.nanmean(hd_mm[:, c])) if len(hd_mm) else float("nan")
            out["hausdorff_mm"] = float(np.nanmean(hd_mm)) if hd_mm.size else float("nan")
            out["hausdorff_mm_pairs"] = int(np.isfinite(hd_mm).sum())
    dice = dice_from_stats(stats, empty)
    present = (stats[..., 1] + stats[..., 2]) > 0
    saved = time_saved(dice, present, threshold)
    with np.errstate(invalid="ignore"):
        for c, name in enumerate(classes):
            col = hd[:, c]
            out[f"hausdorff_{name}"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
            out[f"time_saved_{name}"] = float(saved[c])
        out["hausdorff"] = float(np.nanmean(hd)) if np.isfinite(hd).any() else float("nan")
        out["hausdorff_merged"] = float(np.nanmean(hd_merged)) if np.isfinite(hd_merged).any() else float("nan")
        out["time_saved_mean"] = float(np.nanmean(saved)) if np.isfinite(saved).any() else float("nan")
    hd_for_score = 0.0 if np.isnan(out["hausdorff"]) else out["hausdorff"]  # nothing anywhere: perfect
    out["score"] = competition_score(out["dice_mean"], hd_for_score)
    out["n_slices"] = int(len(stats))
    out["n_volumes"] = int(len(hd))
    return out


def score_predictions(adapter: DatasetAdapter, index: pd.DataFrame, pred: pd.DataFrame, empty: str = "1",
                      threshold: float = 0.9, source: str = "submission",
                      workers: int | None = None, in_mm: bool = False) -> tuple[dict, pd.DataFrame]:
    """Overall figures and a per-case table for predictions ``pred`` (id + pred_<class>) against the ground truth
    of ``index`` (read by ``adapter``, which also says which rows form a volume). Volumes are scored in
    ``workers`` threads (default: one per core; the distance transforms of the 3D Hausdorff release the GIL).
    ``in_mm``: also the Hausdorff distance in millimetres (metrics.hausdorff_mm), for data whose index has the
    through-plane spacing (``spacing_z``: nnU-Net datasets)."""
    if empty not in EMPTY_RULES:
        raise UserError(f"--empty_dice must be one of {EMPTY_RULES}, got {empty!r}")
    classes, volume = adapter.classes, list(adapter.volume_columns)
    rows = _align(index, pred, source, volume)
    check_volume_sizes(rows, adapter.volume_columns, source)
    spacing = ["spacing_x", "spacing_y", "spacing_z"]
    if in_mm and (not set(spacing) <= set(rows) or rows[spacing].isna().any().any()):
        raise UserError(f"--hausdorff_mm: {adapter.name} data does not say its voxel spacing in every direction (an "
                        "index column spacing_z, as nnU-Net datasets have); the normalised Hausdorff is still scored")

    def one_volume(grp: pd.DataFrame):
        """(row positions, (D, C, 3) stats, per-class Hausdorff, merged Hausdorff, case) of one volume."""
        shape = (int(grp["height"].iloc[0]), int(grp["width"].iloc[0]))
        vp = np.zeros((len(classes), len(grp), *shape), bool)
        vt = np.zeros_like(vp)
        for k, r in enumerate(grp.itertuples()):
            for c, name in enumerate(classes):
                try:
                    vp[c, k] = decode_rle(getattr(r, f"pred_{name}"), shape, where=f"{source} id {r.id} class {name}")
                except RLEError as e:
                    raise UserError(str(e)) from None
            vt[:, k] = adapter.read_masks(r)
            unlabelled = adapter.ignored(r)
            if unlabelled is not None:  # predictions there count neither way
                vp[:, k] &= ~unlabelled
        spacing = tuple(float(grp[f"spacing_{a}"].iloc[0]) for a in "zyx") if in_mm else None
        return (grp.index, mask_stats(vp, vt).transpose(1, 0, 2),  # (C, D, 3) -> (D, C, 3)
                [hausdorff_3d(vp[c], vt[c]) for c in range(len(classes))], hausdorff_3d(vp.any(0), vt.any(0)),
                grp["case"].iloc[0], [hausdorff_mm(vp[c], vt[c], spacing) for c in range(len(classes))] if in_mm
                else [])

    stats = np.zeros((len(rows), len(classes), 3))
    vol_case, hd, hd_merged, hd_mm = [], [], [], []
    groups = [grp for _, grp in rows.groupby(volume, sort=False)]
    with ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1)) as pool:
        for where, vol_stats, vol_hd, vol_merged, case, vol_mm in pool.map(one_volume, groups):  # in volume order
            stats[where] = vol_stats
            hd.append(vol_hd)
            hd_merged.append(vol_merged)
            vol_case.append(case)
            hd_mm.append(vol_mm)
    hd, hd_merged, vol_case = np.array(hd), np.array(hd_merged), np.array(vol_case)
    hd_mm = np.array(hd_mm, float).reshape(len(hd), len(classes)) if in_mm else None
    overall = figures_from_stats(stats, hd, hd_merged, empty, threshold, classes, hd_mm)
    per_case = []
    for case in sorted(rows["case"].unique()):
        sel, vsel = rows["case"].to_numpy() == case, vol_case == case
        per_case.append({"case": int(case), **figures_from_stats(stats[sel], hd[vsel], hd_merged[vsel], empty, threshold,
                                                       classes, None if hd_mm is None else hd_mm[vsel])})
    return overall, pd.DataFrame(per_case)


def format_table(overall: dict, per_case: pd.DataFrame, classes: tuple[str, ...]) -> str:
    """A Markdown table: one row per case and an 'all' row."""
    cols = [*(f"dice_{c}" for c in classes), "dice_mean", "global_dice_mean", "iou_mean", "hausdorff", "score",
            "time_saved_mean"]
    head = "| case | slices | " + " | ".join(cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 2)]
    for rec in [*per_case.to_dict("records"), {"case": "all", **overall}]:
        lines.append(f"| {rec['case']} | {rec['n_slices']} | " + " | ".join(f"{rec[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
