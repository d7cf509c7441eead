"""The figures of a cross-validation (giseg cv; giseg/training/cv.py trains its folds): each fold's val_scores.json,
the CV table (mean and sample sd over the folds), the out-of-fold row (every fold's validation predictions scored as
one submission) and the out-of-fold score of an ensemble of finished CVs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from giseg.data.folds import split_by_case
from giseg.data.registry import get_adapter
from giseg.evaluation.presence import presence_figures
from giseg.evaluation.score import score_predictions, submission_to_wide
from giseg.inference.ensemble import Ensemble
from giseg.inference.submission import predict_rows
from giseg.models.tasks import MULTILABEL, get_task
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json, atomic_write_text
from giseg.utils.log import logger

FIGURES = ("dice_mean", "hausdorff", "score")
PRESENCE_FIGURES = ("auc_mean", "f1_mean", "empty_correct")  # --task presence: slice classifiers' folds


def figure_columns(classes: tuple[str, ...], task: str) -> list[str]:
    """The CV table's columns: the task's per-class figure (Dice, or a slice classifier's AUC) and its summaries."""
    t = get_task(task)
    return [*(f"{t.figure}_{c}" for c in classes), *(FIGURES if t.segments else PRESENCE_FIGURES)]


def fold_figures(cv_dir: Path, folds: list[int]) -> list[dict]:
    """Each fold's val_scores.json (trainer.py --final_eval), with its fold number."""
    rows = []
    for k in folds:
        path = cv_dir / f"fold_{k}" / "val_scores.json"
        if not path.is_file():
            raise UserError(f"{path} missing: fold {k} has not finished with --final_eval")
        scores = json.loads(path.read_text())
        rows.append({"fold": k, **{key: v for key, v in scores.items() if not isinstance(v, (list, dict))}})
    return rows


def cv_table(rows: list[dict], classes: tuple[str, ...], oof: dict | None,
             task: str = MULTILABEL.name) -> tuple[dict, str]:
    """(summary with mean and sd over folds of every figure, Markdown table)."""
    cols = figure_columns(classes, task)
    values = np.array([[r[c] for c in cols] for r in rows], dtype=float)
    mean = values.mean(0)
    sd = values.std(0, ddof=1) if len(rows) > 1 else np.zeros(len(cols))
    summary = {"folds": rows, "mean": dict(zip(cols, mean.tolist())), "sd": dict(zip(cols, sd.tolist())),
               "out_of_fold": oof}
    lines = ["| fold | slices | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for r in rows:
        lines.append(f"| {r['fold']} | {r['n_slices']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    lines.append(f"| mean ± sd | {sum(r['n_slices'] for r in rows)} | " +
                 " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(mean, sd)) + " |")
    if oof is not None:
        lines.append(f"| out of fold | {oof['n_slices']} | " + " | ".join(f"{oof[c]:.4f}" for c in cols) + " |")
    return summary, "\n".join(lines)


def presence_out_of_fold(cv_dir: Path, folds: list[int], classes: tuple[str, ...]) -> dict:
    """A slice classifier CV's out-of-fold figures: every fold's val_presence.csv together (oof_presence.csv)."""
    table = pd.concat([pd.read_csv(cv_dir / f"fold_{k}" / "val_presence.csv") for k in folds], ignore_index=True)
    atomic_write_text(cv_dir / "oof_presence.csv", table.to_csv(index=False))
    wide = {name: table.pivot(index="id", columns="class", values=name)[list(classes)].to_numpy()
            for name in ("probability", "predicted", "present")}
    return presence_figures(wide["probability"], wide["present"] > 0, (0.5,) * len(classes), classes,
                            wide["predicted"] > 0)


def score_out_of_fold(cv_dir: Path, folds: list[int], index: pd.DataFrame, adapter, empty: str) -> dict:
    """Every fold's validation predictions in one submission, scored against the whole ground truth."""
    sub = pd.concat([pd.read_csv(cv_dir / f"fold_{k}" / "val_submission.csv", dtype=str, keep_default_na=False)
                     for k in folds], ignore_index=True)
    atomic_write_text(cv_dir / "oof_submission.csv", sub.to_csv(index=False))
    overall, _ = score_predictions(adapter, index, submission_to_wide(sub, classes=adapter.classes), empty)
    return overall


def score_ensemble(cv_dirs: list[Path], data_dir: str, out_dir: Path, weights: list[float] | None,
                   cache_dir: str, num_workers: int, batch_size: int = 16, mixed_precision: str = "no",
                   allow_bin: bool = False) -> dict:
    """Out-of-fold figures of the ensemble of several CVs (see the module's doc)."""
    configs = [json.loads((d / "cv_config.json").read_text()) if (d / "cv_config.json").is_file() else None
               for d in cv_dirs]
    missing = [str(d) for d, c in zip(cv_dirs, configs) if c is None]
    if missing:
        raise UserError(f"--ensemble {missing[0]}: no cv_config.json; pass folders written by giseg cv")
    folds = sorted(set.intersection(*(set(c["folds"]) for c in configs)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    subs, adapter, index = [], None, None
    for k in folds:
        model = Ensemble.load([d / f"fold_{k}" / "best" for d in cv_dirs], device, weights, allow_bin)
        splits = {json.dumps(m.spec.split, sort_keys=True) for m in model.members}
        if len(splits) != 1:
            raise UserError(f"fold {k}: the CVs were split differently ({', '.join(sorted(splits))}); an out-of-fold "
                            "ensemble needs the same --n_folds and --split_seed")
        if adapter is None:
            spec = model.spec
            adapter = get_adapter(spec.dataset).bind(data_dir, spec.dataset_options or {}, spec.classes)
            index = adapter.build_index(data_dir)
        s = model.spec.split
        _, rows = split_by_case(index, s["fold"], s["n_folds"], s["split_seed"])
        inputs = model.inputs(adapter, index, cache_dir, num_threads=max(1, num_workers))
        subs.append(predict_rows(model, index, rows, inputs, adapter.volume_columns, batch_size, mixed_precision,
                                 num_workers=num_workers))
        logger.info("ensemble: fold %d predicted (%d slices, %d models)", k, len(rows), len(model.members))
    sub = pd.concat(subs, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "ensemble_submission.csv", sub.to_csv(index=False))
    overall, _ = score_predictions(adapter, index, submission_to_wide(sub, classes=adapter.classes))
    atomic_write_json(out_dir / "ensemble_scores.json", {**overall, "cvs": [str(d) for d in cv_dirs],
                                                         "weights": weights, "folds": folds})
    logger.info("ensemble of %s, out of fold (%d slices): score %.4f, mean Dice %.4f, Hausdorff %.4f -> %s",
                ", ".join(map(str, cv_dirs)), overall["n_slices"], overall["score"], overall["dice_mean"],
                overall["hausdorff"], out_dir / "ensemble_scores.json")
    return overall
