"""Case-level folds: whole cases go to folds, so a case is never in both training and validation."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from giseg.utils.errors import UserError


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
    """The one check of --fold / --n_folds (the trainer calls it before any data work, giseg predict through
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


def data_record(index: pd.DataFrame, train_rows: np.ndarray | None = None, val_rows: np.ndarray | None = None) -> dict:
    """What a run (or a CV) was trained on, for run_config.json: slice and case counts, the validation cases and
    a SHA-256 of the slice ids in each part. A resume or a reuse compares it (data_changes): a case removed or
    added, or another split, is refused rather than silently moving a training case into validation."""
    ids = index["id"].astype(str).to_numpy()
    h = hashlib.sha256()
    for name, rows in (("train", train_rows), ("val", val_rows)):
        part = ids if rows is None else ids[rows]
        h.update(f"{name}:{len(part)}\n".encode() + "\n".join(sorted(part)).encode() + b"\n")
    cases = sorted(index["case"].unique().tolist())
    val_cases = [] if val_rows is None else sorted(index["case"].iloc[val_rows].unique().tolist())
    return {"slices": len(index), "cases": len(cases), "case_ids": cases, "val_cases": val_cases,
            "sha256": h.hexdigest()}


def data_changes(saved: dict, now: dict) -> str | None:
    """None when the two data_records are the same data and split; else what differs, in a phrase."""
    if saved.get("sha256") == now["sha256"]:
        return None
    then_cases, now_cases = set(saved.get("case_ids", [])), set(now["case_ids"])
    parts = [f"{saved.get('slices')} slices in {saved.get('cases')} cases then, {now['slices']} in {now['cases']} now"]
    if then_cases - now_cases:
        parts.append(f"case(s) {sorted(then_cases - now_cases)[:5]} gone")
    if now_cases - then_cases:
        parts.append(f"case(s) {sorted(now_cases - then_cases)[:5]} new")
    if saved.get("val_cases") != now["val_cases"]:
        parts.append(f"validation cases {saved.get('val_cases')} then, {now['val_cases']} now")
    if len(parts) == 1 and saved.get("slices") == now["slices"]:
        parts.append("the slice ids differ")
    return "; ".join(parts)
