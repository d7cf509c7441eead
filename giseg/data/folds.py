"""Case-level folds: whole cases go to folds, so a case is never in both training and validation."""
from __future__ import annotations

import numpy as np
import pandas as pd

from giseg.utils import UserError


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
