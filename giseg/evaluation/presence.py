"""Slice-classifier figures (--task presence): per class AUC and F1, and the share of empty slices kept empty.

    auc_<class>    area under the ROC curve of the class's probability (threshold-free; NaN when the validation
                   slices are all with or all without the class)
    f1_<class>     F1 of "present" at the classifier's threshold
    auc_mean, f1_mean   their means over the classes (AUC: over those where it is defined)
    empty_correct  of the slices that show no class, the share where every class is called absent: what a gate
                   saves (a false positive on an empty slice costs that pair's whole Dice)
Vectorised: one rank computation per class (scipy.stats.rankdata), no Python loop over slices. The targets are
data/masks.py presence_targets, the training loss's own.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from giseg.data.masks import presence_targets


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half); NaN with one kind only."""
    truth = np.asarray(truth, bool)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # (0.5 s of start-up that trainer.py --help and a rejected flag do not need)

    ranks = rankdata(scores)
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


def f1_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 of boolean predictions; 1.0 when neither has a positive."""
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 1.0 if denom == 0 else 2 * tp / denom


def presence_figures(probs: np.ndarray, truth: np.ndarray, thresholds, classes: tuple[str, ...],
                     pred: np.ndarray | None = None) -> dict:
    """Figures of (N, C) probabilities against (N, C) truth at per-class ``thresholds`` (see the module's doc);
    ``pred``: the (N, C) calls, when they were made at other thresholds per slice (out-of-fold rows)."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth, bool)
    if pred is None:
        pred = probs >= np.asarray(thresholds, np.float64).reshape(1, -1)
    pred = np.asarray(pred, bool)
    out: dict = {}
    for c, name in enumerate(classes):
        out[f"auc_{name}"] = roc_auc(probs[:, c], truth[:, c])
        out[f"f1_{name}"] = f1_score(pred[:, c], truth[:, c])
    aucs = [out[f"auc_{n}"] for n in classes if np.isfinite(out[f"auc_{n}"])]
    out["auc_mean"] = float(np.mean(aucs)) if aucs else float("nan")
    out["f1_mean"] = float(np.mean([out[f"f1_{n}"] for n in classes]))
    empty = ~truth.any(1)
    out["empty_correct"] = float((~pred[empty].any(1)).mean()) if empty.any() else float("nan")
    out["n_slices"], out["n_empty"] = int(len(truth)), int(empty.sum())
    return out


def selection_figure(figures: dict) -> tuple[str, float]:
    """(its name, its value): the figure a presence run keeps its best model by. The mean AUC; where no class has
    one (each needs a validation slice with the class and one without), the mean F1, so an undefined figure never
    selects a model, and the log names the one that did."""
    auc = figures.get("auc_mean", float("nan"))
    if np.isfinite(auc):
        return "mean AUC", float(auc)
    return "mean F1 (AUC undefined: no class has validation slices both with and without it)", float(figures["f1_mean"])


def figure(value: float) -> str:
    """A figure for a log line: 4 decimals, or 'undefined' (NaN: an AUC of a class every slice shows, or none)."""
    return f"{value:.4f}" if np.isfinite(value) else "undefined"


def describe_presence(figures: dict, classes: tuple[str, ...]) -> str:
    """The evaluation part of a log line, e.g. ``auc a 0.91 b 0.88 | mean 0.89 | f1 mean 0.80 | empty correct
    0.85 (40 empty slices)``."""
    return (" | ".join(["auc " + " ".join(f"{c} {figure(figures[f'auc_{c}'])}" for c in classes),
                        f"mean {figure(figures['auc_mean'])}",
                        "f1 " + " ".join(f"{c} {figures[f'f1_{c}']:.4f}" for c in classes),
                        f"f1 mean {figures['f1_mean']:.4f}"])
            + f" | empty correct {figure(figures['empty_correct'])} ({figures['n_empty']} empty slices)")


def evaluate_presence(model: torch.nn.Module, loader, accelerator, thresholds, classes: tuple[str, ...]) -> dict:
    """Validation BCE and the presence figures of a classifier model (``(logits, None)`` = model(pixels)), gathered
    across processes without padded duplicates: one host transfer per evaluation."""
    model.eval()
    probs, truth = [], []
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits = model(batch["pixel_values"])[0]
            target = presence_targets(batch["mask"], len(classes))
            loss_sum += torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
            count += target.numel()
            probs.append(accelerator.gather_for_metrics(torch.sigmoid(logits.float())))
            truth.append(accelerator.gather_for_metrics(target))
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    model.train()
    p, t = torch.cat(probs).cpu().numpy(), torch.cat(truth).cpu().numpy() > 0.5
    return {**presence_figures(p, t, thresholds, classes), "val_loss": float(loss_sum / count.clamp_min(1)),
            "val_slices": int(len(t))}


def score_classifier(classifier, adapter, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
                     batch_size: int = 16, mixed_precision: str = "no") -> tuple[dict, pd.DataFrame]:
    """A slice classifier (inference/gate.py SliceClassifier) on ``rows`` against each slice's classes at original
    size (labelled pixels only): its figures at its own thresholds, and the table (id, class, probability,
    predicted, present) that cv.py pools out of fold."""
    classes = classifier.spec.classes
    probs = dict(classifier.iter_presence(rows, cache, neighbours, batch_size, mixed_precision))

    def shown(r: int) -> np.ndarray:
        row = index.iloc[r]
        masks, ignored = adapter.read_masks(row).astype(bool), adapter.ignored(row)
        return (masks & ~ignored if ignored is not None else masks).reshape(len(classes), -1).any(1)

    truth = np.stack([shown(r) for r in rows])
    p = np.stack([probs[r] for r in rows])
    pred = p >= np.asarray(classifier.spec.thresholds, np.float32)
    table = pd.DataFrame({"id": np.repeat(index["id"].to_numpy()[rows], len(classes)),
                          "class": np.tile(classes, len(rows)), "probability": p.ravel().round(6),
                          "predicted": pred.ravel().astype(int), "present": truth.ravel().astype(int)})
    return presence_figures(p, truth, classifier.spec.thresholds, classes, pred), table
