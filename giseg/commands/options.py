"""Options and their parsing shared by several commands (predict, tune, cv, score): declared once here."""
from __future__ import annotations

import math
from dataclasses import dataclass

from giseg.evaluation.empty_rule import empty_dice_flag
from giseg.models.safe import ALLOW_BIN_HELP
from giseg.utils.errors import UserError
from giseg.utils.options import at_least, check_options, flag, mixed_precision_flag


@dataclass
class RunOptions:
    """How a command runs models over a data folder: giseg predict, tune and cv --ensemble."""
    weights: str = flag("", "ensemble weights, comma-separated, one per model (or per CV); empty: equal")
    cache_dir: str = flag("cache", "decode-once cache folder")
    batch_size: int = flag(16, "slices per forward pass", **at_least(1))
    mixed_precision: str = mixed_precision_flag("bf16")
    num_workers: int = flag(2, "data-loader workers", **at_least(0))
    allow_bin: bool = flag(False, ALLOW_BIN_HELP)


@dataclass
class ScoringOptions:
    """How figures are scored: giseg score and tune."""
    empty_dice: str = empty_dice_flag()
    workers: int = flag(0, "threads scoring volumes (0: one per core)", **at_least(0))


def check_run_options(args) -> None:
    """One line for a value no run can use (each RunOptions flag's own check)."""
    check_options(args, RunOptions)


def parse_thresholds(text: str | None, classes: tuple[str, ...]) -> tuple[float, ...] | None:
    """--thresholds as one value in (0, 1) per class, or None (the model's saved ones)."""
    if not text:
        return None
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(classes) or not all(0 < t < 1 for t in values):
        raise UserError(f"--thresholds needs {len(classes)} comma-separated values in (0, 1) ({', '.join(classes)}), "
                        f"got {text!r}")
    return values


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """--weights: ``n`` positive comma-separated numbers, or None (equal)."""
    if not text:
        return None
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--weights needs {n} positive (finite) comma-separated values (one per --model), got {text!r}")
    return values


def check_split(trained: dict | None, fold: int, n_folds: int | None, split_seed: int | None, model: str) -> dict:
    """The split that --fold / --n_folds / --split_seed name, refused unless it is the model's own validation fold
    (another fold, or another split, holds slices the model was trained on: its scores would be inflated)."""
    asked = {"n_folds": n_folds if n_folds is not None else (trained or {}).get("n_folds", 5), "fold": fold,
             "split_seed": split_seed if split_seed is not None else (trained or {}).get("split_seed", 42)}
    if trained is not None and asked != trained:
        def flags(s: dict) -> str:
            return f"--fold {s['fold']} --n_folds {s['n_folds']} --split_seed {s['split_seed']}"
        raise UserError(f"{flags(asked)}: the model {model} was trained with the validation fold {flags(trained)}; "
                        "other slices were in its training set. Pass its own fold, or omit --fold to predict every slice")
    return asked
