"""Tune per-class thresholds, empty-slice gates and 3D post-processing on validation data; save them with the model.

    giseg tune --model runs/<name>/best --data_dir <folder>          # the model's own validation fold
    giseg tune --cv runs/<cv> --data_dir <folder>                    # out of fold: each fold's best/ on its cases
    giseg tune --cv runs/<cv1> runs/<cv2> --out ens.json ...         # their fold-by-fold ensemble, out of fold
    giseg tune --model runs/a/best runs/b/best --out ens.json ...    # an ensemble (members share a split)

For each class in turn, a greedy search maximises the competition score (0.4 Dice + 0.6 (1 - 3D Hausdorff), the
giseg score figures at original size) over: the probability threshold (multilabel), then the gates (drop the class
from a slice when its predicted area is below a fraction of the slice, or its highest probability is below p),
with --gate_model the slice gate (drop it where the slice classifiers' probability is below t or at most n of its
pixels are predicted; the classifiers must share the segmenter's split, or each CV fold's its fold), then the
volume's 3D connected components: keep the largest, or drop those of fewer than 100, 500 or 2,000 voxels. It starts from the untuned decisions
(threshold as saved, no gates, no post-processing) and adopts a change only when it raises the score (nnU-Net's
rule for post-processing), so the result never scores below the start on the data it was tuned on.

An ensemble of 2D and 3D members (without --weights) gets its blend first: the 2D members' share of the average,
from the UW-Madison winner's 0.6 (0.4 for its 3D models), another of 0.3-0.8 adopted only when it scores higher
under the untuned decisions; the weights go into --out, and giseg predict --tuned averages with them.

The choices go into the inference spec of every tuned model folder (giseg predict, the app and evaluation/figures.py use them;
giseg predict --thresholds still overrides), or into --out for an ensemble (giseg predict --tuned). tuning.json and
tuning.md (before/after, per class) are written beside them.
"""
from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.evaluation.metrics import hausdorff_3d, mask_stats
from giseg.evaluation.score import figures_from_stats
from giseg.inference.ensemble import Ensemble, group_by_volume
from giseg.inference.gate import gate_slice
from giseg.inference.postprocess import apply_rule, gate
from giseg.inference.spec import InferenceSpec
from giseg.models.tasks import get_task
from giseg.utils.errors import UserError
from giseg.utils.log import logger

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
MIN_PROB = (0.0, 0.5, 0.6, 0.7, 0.8)
MIN_AREA = (0.0, 0.0005, 0.001, 0.002, 0.005)
MIN_VOXELS = (100, 500, 2000)  # "min:<N>": drop 3D components smaller than this, at original size
GATE_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # the slice gate (--gate_model): classifier probability
GATE_MIN_PIXELS = (0, 12, 50, 200)  # ... and more than this many predicted pixels at original size
DECISIONS = ("thresholds", "min_area", "min_prob", "postprocess", "gate_threshold", "gate_min_pixels")
SEARCH = ("blend", "thresholds", "gates", "slice_gate", "postprocess")  # the steps of the search, in order; blend:
# an ensemble of 2D and 3D members without --weights only; slice_gate: with --gate_model only
# the 2D (and 2.5D) members' share of an ensemble with 3D members; the first, the UW-Madison winner's 0.6 (with 0.4
# for its 3D models), is the start: another share is adopted only when it scores higher
BLEND = (0.6, 0.3, 0.4, 0.5, 0.7, 0.8)


@dataclasses.dataclass
class Volume:
    """One validation volume: class probabilities (D, C, H, W) float32 (as giseg predict thresholds them: float16 moved
    borderline pixels and the tuned score by 0.003 on the demo; 4 bytes per pixel and class of the validation set),
    the task's base masks for multiclass (argmax; None for multilabel), the truth (D, C, H, W) bool and the
    unlabelled pixels (D, H, W) or None."""
    rows: np.ndarray
    probs: np.ndarray
    argmax: np.ndarray | None
    truth: np.ndarray
    ignored: np.ndarray | None
    presence: np.ndarray | None = None  # (D, C) the slice gate's probabilities (tune --gate_model), or None


def collect_volumes(model: Ensemble, adapter, index: pd.DataFrame, rows: np.ndarray, cache_dir: str,
                    batch_size: int, mixed_precision: str, num_workers: int, gate=None) -> list[Volume]:
    """The model's probabilities on ``rows`` (whole volumes, in index order) with their ground truth; with
    ``gate`` (a SliceGate) its presence probabilities too."""
    task, n_classes = model.spec.task, len(model.spec.classes)
    model = model.with_gate(gate)  # (checks that the gate fits; its classifiers share the members' caches)
    inputs = model.inputs(adapter, index, cache_dir, num_threads=max(1, num_workers))
    presence = None
    if gate is not None:
        presence = dict(gate.iter_presence(rows, inputs[len(model.members):], batch_size, mixed_precision,
                                           num_workers))

    def close(items):
        rs = np.array([r for r, _ in items])
        probs = np.stack([p for _, p in items])  # (D, K, H, W)
        cls = get_task(task).class_channels(probs)
        argmax = None
        if get_task(task).background:
            argmax = probs.argmax(1)[:, None] == np.arange(1, n_classes + 1).reshape(1, -1, 1, 1)
        truth = np.stack([adapter.read_masks(index.iloc[r]).astype(bool) for r in rs])
        ign = [adapter.ignored(index.iloc[r]) for r in rs]
        ignored = None if all(i is None for i in ign) else np.stack(
            [i if i is not None else np.zeros(truth.shape[-2:], bool) for i in ign])
        gated = None if presence is None else np.stack([presence[r] for r in rs])
        return Volume(rs, cls.astype(np.float32), argmax, truth, ignored, gated)

    probs = model.iter_probabilities(index, rows, inputs, batch_size, mixed_precision, False, num_workers)
    return [close(volume) for volume in group_by_volume(probs, index[list(adapter.volume_columns)].to_numpy())]


class Tuner:
    """Scores per-class decisions on a list of volumes; caches the statistics of each class's candidates."""

    def __init__(self, volumes: list[Volume], task: str, classes: tuple[str, ...], empty: str, workers: int,
                 search: tuple[str, ...] = SEARCH):
        self.volumes, self.task, self.classes, self.empty, self.search_steps = volumes, task, classes, empty, search
        self.argmax = get_task(task).background  # decided by the argmax over background + classes: no thresholds
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.n_slices = sum(len(v.rows) for v in volumes)
        self.evaluated = 0

    def class_masks(self, v: Volume, c: int, d: dict) -> np.ndarray:
        """(D, H, W) masks of class ``c`` of volume ``v`` under decisions ``d`` (one class's values)."""
        p = v.probs[:, c]
        m = v.argmax[:, c] if self.argmax else p > np.float32(d["thresholds"])
        m = gate(m[:, None], p[:, None], (d["min_area"],), (d["min_prob"],))[:, 0]  # giseg predict's own gate
        if v.presence is not None:  # the slice gate, as Ensemble.iter_masks applies it
            m = gate_slice(m[:, None], v.presence[:, c:c + 1], (d["gate_threshold"],), (d["gate_min_pixels"],))[:, 0]
        if d["postprocess"] != "none":
            m = apply_rule(m, d["postprocess"])
        if v.ignored is not None:
            m = m & ~v.ignored
        return m

    def class_figures(self, c: int, d: dict) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) per-slice statistics and (V,) 3D Hausdorff of class ``c`` under ``d``, over all volumes."""
        def one(v: Volume):
            m = self.class_masks(v, c, d)
            return mask_stats(m[:, None], v.truth[:, c:c + 1])[:, 0], hausdorff_3d(m, v.truth[:, c])

        out = list(self.pool.map(one, self.volumes))
        self.evaluated += 1
        return np.concatenate([s for s, _ in out]), np.array([h for _, h in out])

    def figures(self, per_class: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        stats = np.stack([s for s, _ in per_class], axis=1)  # (N, C, 3)
        hd = np.stack([h for _, h in per_class], axis=1)  # (V, C)
        return figures_from_stats(stats, hd, np.zeros(len(hd)), self.empty, 0.9, self.classes)

    def search(self, start: list[dict]) -> tuple[list[dict], dict, dict]:
        """Greedy per-class search from ``start`` (one dict of DECISIONS per class): (chosen, before, after)."""
        chosen = [dict(d) for d in start]
        current = [self.class_figures(c, d) for c, d in enumerate(chosen)]
        before = self.figures(current)
        best = before["score"]
        for c, name in enumerate(self.classes):
            grids = []
            if not self.argmax and "thresholds" in self.search_steps:
                grids.append([{"thresholds": t} for t in THRESHOLDS])
            if "gates" in self.search_steps:
                grids.append([{"min_prob": p, "min_area": a} for p in MIN_PROB for a in MIN_AREA])
            if "slice_gate" in self.search_steps and self.volumes and self.volumes[0].presence is not None:
                grids.append([{"gate_threshold": t, "gate_min_pixels": n} for t in GATE_THRESHOLDS
                              for n in GATE_MIN_PIXELS])
            if "postprocess" in self.search_steps:
                grids.append([{"postprocess": "largest"}, *({"postprocess": f"min:{n}"} for n in MIN_VOXELS),
                              {"postprocess": "none"}])
            for grid in grids:
                for change in grid:
                    trial = {**chosen[c], **change}
                    if trial == chosen[c]:
                        continue
                    figs = self.class_figures(c, trial)
                    score = self.figures([figs if k == c else current[k] for k in range(len(current))])["score"]
                    if score > best + 1e-12:
                        best, chosen[c], current[c] = score, trial, figs
            logger.info("tuned %s: threshold %s, min_area %g, min_prob %g, slice gate >= %g and > %d pixels, "
                        "post-processing %s (score %.4f)", name,
                        "argmax" if self.argmax else chosen[c]["thresholds"], chosen[c]["min_area"],
                        chosen[c]["min_prob"], chosen[c]["gate_threshold"], chosen[c]["gate_min_pixels"],
                        chosen[c]["postprocess"], best)
        return chosen, before, self.figures(current)


def blend_volumes(flat: list[Volume], deep: list[Volume], share: float, task: str) -> list[Volume]:
    """The 2D members' volumes and the 3D members' (the same volumes, in the same order) blended: ``share`` x the 2D
    probabilities + (1 - ``share``) x the 3D ones (multiclass: the argmax over the blended background, 1 - the
    classes' sum, and classes)."""
    out = []
    for a, b in zip(flat, deep):
        probs = (np.float32(share) * a.probs + np.float32(1 - share) * b.probs).astype(np.float32)
        argmax = None
        if get_task(task).background:
            full = np.concatenate([1 - probs.sum(1, keepdims=True), probs], axis=1)
            argmax = full.argmax(1)[:, None] == np.arange(1, probs.shape[1] + 1).reshape(1, -1, 1, 1)
        out.append(dataclasses.replace(a, probs=probs, argmax=argmax))
    return out


def choose_blend(flat: list[Volume], deep: list[Volume], spec: InferenceSpec, empty: str,
                 workers: int) -> tuple[float, dict[float, float]]:
    """(the 2D members' share, the score of every share of BLEND) under the untuned decisions: BLEND's first unless
    another scores higher."""
    start, scores = start_decisions(spec), {}
    for share in BLEND:
        tuner = Tuner(blend_volumes(flat, deep, share, spec.task), spec.task, spec.classes, empty, workers, ())
        scores[share] = tuner.figures([tuner.class_figures(c, d) for c, d in enumerate(start)])["score"]
    best = BLEND[0]
    for share in BLEND[1:]:
        if scores[share] > scores[best] + 1e-12:
            best = share
    return best, scores


def start_decisions(spec: InferenceSpec) -> list[dict]:
    """The untuned decisions of a spec: its thresholds (0.5 for multiclass, unused), no gates, no post-processing."""
    n = len(spec.classes)
    thresholds = spec.thresholds or (0.5,) * n
    return [{"thresholds": thresholds[c], "min_area": 0.0, "min_prob": 0.0, "postprocess": "none",
             "gate_threshold": 0.0, "gate_min_pixels": 0} for c in range(n)]


def as_spec_values(chosen: list[dict], task: str, gated: bool = False) -> dict:
    """Per-class dicts -> the spec's tuples (no thresholds for multiclass; no slice gate (None) unless ``gated``:
    tuned with --gate_model)."""
    values = {k: tuple(d[k] for d in chosen) for k in DECISIONS}
    if get_task(task).background:
        values["thresholds"] = ()
    if not gated:  # (tuned with a gate, "off" is a decision too: 0 and 0, not None, which means the classifiers' own)
        values["gate_threshold"] = values["gate_min_pixels"] = None
    return values


def report_markdown(classes, chosen: list[dict], before: dict, after: dict, task: str, source: str) -> str:
    lines = [f"# Tuning on {source}", "",
             "| class | threshold | min_area | min_prob | slice gate | post-processing | Dice before | Dice after | "
             "Hausdorff before | Hausdorff after |", "|" + " --- |" * 10]
    for c, name in enumerate(classes):
        d = chosen[c]
        slice_gate = (f">= {d['gate_threshold']:g}, > {d['gate_min_pixels']} px"
                      if d.get("gate_threshold") or d.get("gate_min_pixels") else "off")
        lines.append(f"| {name} | {'argmax' if get_task(task).background else d['thresholds']} | {d['min_area']:g} | "
                     f"{d['min_prob']:g} | {slice_gate} | {d['postprocess']} | {before[f'dice_{name}']:.4f} | {after[f'dice_{name}']:.4f}"
                     f" | {before[f'hausdorff_{name}']:.4f} | {after[f'hausdorff_{name}']:.4f} |")
    lines += ["", f"score {before['score']:.4f} -> {after['score']:.4f}; mean Dice {before['dice_mean']:.4f} -> "
                  f"{after['dice_mean']:.4f}; Hausdorff {before['hausdorff']:.4f} -> {after['hausdorff']:.4f} "
                  f"({before['n_slices']} slices, {before['n_volumes']} volumes)", ""]
    return "\n".join(lines)


def cv_folds(cv_dir: Path) -> list[Path]:
    """The fold models of a CV run folder (giseg cv): fold_<k>/best, in fold order."""
    folds = sorted(cv_dir.glob("fold_*/best"), key=lambda p: int(p.parent.name.split("_")[1]))
    folds = [f for f in folds if f.parent.name.split("_")[1].isdigit()]
    if not folds:
        raise UserError(f"--cv {cv_dir}: no fold_<k>/best folders; pass a folder written by giseg cv")
    return folds


def read_tuned(path: str | Path) -> dict:
    """The decisions of a giseg tune --out file (giseg predict --tuned)."""
    try:
        values = json.loads(Path(path).read_text())["decisions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--tuned {path}: not a giseg tune --out file ({e})") from None
    return {k: tuple(values[k]) for k in DECISIONS if values.get(k) is not None}


def read_tuned_weights(path: str | Path) -> list[float] | None:
    """The ensemble weights a giseg tune --out file chose (a 2D + 3D blend) or was given; None: equal."""
    try:
        weights = json.loads(Path(path).read_text()).get("weights")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"--tuned {path}: not a giseg tune --out file ({e})") from None
    return list(weights) if weights else None
