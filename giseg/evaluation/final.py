"""--final_eval: a finished run's best/ scored on its validation fold at original sizes, as giseg score scores it.

``final_evaluation`` (segmenters: val_submission.csv, val_scores.json, the per-case table in the log) and
``final_presence`` (slice classifiers: val_presence.csv, val_scores.json) take the run's folder, its settings (a
TrainConfig: data_dir, eval_batch_size, mixed_precision, empty_dice, allow_bin), its dataset adapter and its data
(training/build.py's Data: index, val_rows, cache, neighbours).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from giseg.evaluation.presence import describe_presence, score_classifier
from giseg.evaluation.score import format_table, score_predictions, submission_to_wide
from giseg.inference.ensemble import Ensemble
from giseg.inference.gate import SliceClassifier
from giseg.inference.segmenter import Segmenter
from giseg.inference.submission import predict_rows, write_submission
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json, atomic_write_text
from giseg.utils.log import logger


def labelled_index(cfg, adapter, index: pd.DataFrame) -> pd.DataFrame:
    """The run's index with its labels (load_data dropped the codes once the cache held the masks: read again)."""
    if adapter.has_labels(index):
        return index
    labelled = adapter.build_index(cfg.data_dir)
    if not labelled["id"].equals(index["id"]):
        raise UserError(f"--final_eval: {cfg.data_dir} changed during the run (its slices differ from those "
                        "trained on); score best/ with giseg score")
    return labelled


def final_presence(out: Path, cfg, adapter, data, device: torch.device) -> dict:
    """A slice classifier's best/ on the validation fold against each slice's classes at original size; writes
    val_presence.csv (id, class, probability, predicted, present) and val_scores.json."""
    classifier = SliceClassifier.load(out / "best", device, cfg.allow_bin, "--final_eval")
    figures, table = score_classifier(classifier, adapter, labelled_index(cfg, adapter, data.index), data.val_rows,
                                      data.cache, data.neighbours, cfg.eval_batch_size, cfg.mixed_precision)
    atomic_write_text(out / "val_presence.csv", table.to_csv(index=False))
    atomic_write_json(out / "val_scores.json", {**figures, "thresholds": list(classifier.spec.thresholds)})
    logger.info("final eval (best/, original sizes, %d slices): %s -> %s", len(data.val_rows),
                describe_presence(figures, classifier.spec.classes), out / "val_scores.json")
    return figures


def final_evaluation(out: Path, cfg, adapter, data, device: torch.device) -> dict:
    """A segmenter's best/ on the validation fold at original sizes: val_submission.csv and val_scores.json."""
    segmenter = Segmenter.load(out / "best", device)
    index = labelled_index(cfg, adapter, data.index)
    sub = predict_rows(Ensemble([segmenter]), index, data.val_rows, [(data.cache, data.neighbours)],
                       adapter.volume_columns, cfg.eval_batch_size, cfg.mixed_precision)
    write_submission(sub, out / "val_submission.csv")
    classes = segmenter.spec.classes
    overall, per_case = score_predictions(adapter, index, submission_to_wide(sub, classes=classes), cfg.empty_dice)
    atomic_write_json(out / "val_scores.json", {**overall, "per_case": per_case.to_dict("records"),
                                                "empty_dice": cfg.empty_dice})
    for line in format_table(overall, per_case, classes).splitlines():
        logger.info("final eval %s", line)  # (a Markdown row)
    logger.info("final eval (best/, original sizes): dice mean %.4f, hausdorff %.4f, score %.4f -> %s",
                overall["dice_mean"], overall["hausdorff"], overall["score"], out / "val_scores.json")
    return overall
