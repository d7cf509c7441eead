"""Tune per-class thresholds, empty-slice gates and 3D post-processing on validation data; save them with the model.

    python tune.py --model runs/<name>/best --data_dir <folder>          # the model's own validation fold
    python tune.py --cv runs/<cv> --data_dir <folder>                    # out of fold: each fold's best/ on its cases
    python tune.py --cv runs/<cv1> runs/<cv2> --out ens.json ...         # their fold-by-fold ensemble, out of fold
    python tune.py --model runs/a/best runs/b/best --out ens.json ...    # an ensemble (members share a split)

For each class in turn, a greedy search maximises the competition score (0.4 Dice + 0.6 (1 - 3D Hausdorff), the
score.py figures at original size) over: the probability threshold (multilabel), then the gates (drop the class
from a slice when its predicted area is below a fraction of the slice, or its highest probability is below p),
then the volume's 3D connected components: keep the largest, or drop those of fewer than 100, 500 or 2,000
voxels. It starts from the untuned decisions
(threshold as saved, no gates, no post-processing) and adopts a change only when it raises the score (nnU-Net's
rule for post-processing), so the result never scores below the start on the data it was tuned on.

The choices go into the inference spec of every tuned model folder (predict.py, the app and visualise.py use them;
predict.py --thresholds still overrides), or into --out for an ensemble (predict.py --tuned). tuning.json and
tuning.md (before/after, per class) are written beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adapters import get_adapter
from data import split_by_case
from inference import Ensemble, InferenceSpec, group_by_volume
from metrics import EMPTY_RULES, hausdorff_3d, mask_stats
from postprocess import apply_rule, gate
from score import figures_from_stats
from utils import UserError, atomic_write_json, atomic_write_text, command, logger, quiet_third_party, setup_logging

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
MIN_PROB = (0.0, 0.5, 0.6, 0.7, 0.8)
MIN_AREA = (0.0, 0.0005, 0.001, 0.002, 0.005)
MIN_VOXELS = (100, 500, 2000)  # "min:<N>": drop 3D components smaller than this, at original size
DECISIONS = ("thresholds", "min_area", "min_prob", "postprocess")
SEARCH = ("thresholds", "gates", "postprocess")  # the steps of the search, in order


@dataclasses.dataclass
class Volume:
    """One validation volume: class probabilities (D, C, H, W) float32 (as predict.py thresholds them: float16 moved
    borderline pixels and the tuned score by 0.003 on the demo; 4 bytes per pixel and class of the validation set),
    the task's base masks for multiclass (argmax; None for multilabel), the truth (D, C, H, W) bool and the
    unlabelled pixels (D, H, W) or None."""
    rows: np.ndarray
    probs: np.ndarray
    argmax: np.ndarray | None
    truth: np.ndarray
    ignored: np.ndarray | None


def collect_volumes(model: Ensemble, adapter, index: pd.DataFrame, rows: np.ndarray, cache_dir: str,
                    batch_size: int, mixed_precision: str, num_workers: int) -> list[Volume]:
    """The model's probabilities on ``rows`` (whole volumes, in index order) with their ground truth."""
    task, n_classes = model.spec.task, len(model.spec.classes)
    inputs = model.inputs(adapter, index, cache_dir, num_threads=max(1, num_workers))

    def close(items):
        rs = np.array([r for r, _ in items])
        probs = np.stack([p for _, p in items])  # (D, K, H, W)
        cls = probs if task == "multilabel" else probs[:, 1:]
        argmax = None
        if task == "multiclass":
            argmax = probs.argmax(1)[:, None] == np.arange(1, n_classes + 1).reshape(1, -1, 1, 1)
        truth = np.stack([adapter.read_masks(index.iloc[r]).astype(bool) for r in rs])
        ign = [adapter.ignored(index.iloc[r]) for r in rs]
        ignored = None if all(i is None for i in ign) else np.stack(
            [i if i is not None else np.zeros(truth.shape[-2:], bool) for i in ign])
        return Volume(rs, cls.astype(np.float32), argmax, truth, ignored)

    probs = model.iter_probabilities(index, rows, inputs, batch_size, mixed_precision, False, num_workers)
    return [close(volume) for volume in group_by_volume(probs, index[list(adapter.volume_columns)].to_numpy())]


class Tuner:
    """Scores per-class decisions on a list of volumes; caches the statistics of each class's candidates."""

    def __init__(self, volumes: list[Volume], task: str, classes: tuple[str, ...], empty: str, workers: int,
                 search: tuple[str, ...] = SEARCH):
        self.volumes, self.task, self.classes, self.empty, self.search_steps = volumes, task, classes, empty, search
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.n_slices = sum(len(v.rows) for v in volumes)
        self.evaluated = 0

    def class_masks(self, v: Volume, c: int, d: dict) -> np.ndarray:
        """(D, H, W) masks of class ``c`` of volume ``v`` under decisions ``d`` (one class's values)."""
        p = v.probs[:, c]
        m = v.argmax[:, c] if self.task == "multiclass" else p > np.float32(d["thresholds"])
        m = gate(m[:, None], p[:, None], (d["min_area"],), (d["min_prob"],))[:, 0]  # predict.py's own gate
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
            if self.task == "multilabel" and "thresholds" in self.search_steps:
                grids.append([{"thresholds": t} for t in THRESHOLDS])
            if "gates" in self.search_steps:
                grids.append([{"min_prob": p, "min_area": a} for p in MIN_PROB for a in MIN_AREA])
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
            logger.info("tuned %s: threshold %s, min_area %g, min_prob %g, post-processing %s (score %.4f)", name,
                        chosen[c]["thresholds"] if self.task == "multilabel" else "argmax", chosen[c]["min_area"],
                        chosen[c]["min_prob"], chosen[c]["postprocess"], best)
        return chosen, before, self.figures(current)


def start_decisions(spec: InferenceSpec) -> list[dict]:
    """The untuned decisions of a spec: its thresholds (0.5 for multiclass, unused), no gates, no post-processing."""
    n = len(spec.classes)
    thresholds = spec.thresholds or (0.5,) * n
    return [{"thresholds": thresholds[c], "min_area": 0.0, "min_prob": 0.0, "postprocess": "none"} for c in range(n)]


def as_spec_values(chosen: list[dict], task: str) -> dict:
    """Per-class dicts -> the spec's tuples (no thresholds for multiclass)."""
    values = {k: tuple(d[k] for d in chosen) for k in DECISIONS}
    if task == "multiclass":
        values["thresholds"] = ()
    return values


def report_markdown(classes, chosen: list[dict], before: dict, after: dict, task: str, source: str) -> str:
    lines = [f"# Tuning on {source}", "",
             "| class | threshold | min_area | min_prob | post-processing | Dice before | Dice after | Hausdorff before "
             "| Hausdorff after |", "|" + " --- |" * 9]
    for c, name in enumerate(classes):
        d = chosen[c]
        lines.append(f"| {name} | {d['thresholds'] if task == 'multilabel' else 'argmax'} | {d['min_area']:g} | "
                     f"{d['min_prob']:g} | {d['postprocess']} | {before[f'dice_{name}']:.4f} | {after[f'dice_{name}']:.4f}"
                     f" | {before[f'hausdorff_{name}']:.4f} | {after[f'hausdorff_{name}']:.4f} |")
    lines += ["", f"score {before['score']:.4f} -> {after['score']:.4f}; mean Dice {before['dice_mean']:.4f} -> "
                  f"{after['dice_mean']:.4f}; Hausdorff {before['hausdorff']:.4f} -> {after['hausdorff']:.4f} "
                  f"({before['n_slices']} slices, {before['n_volumes']} volumes)", ""]
    return "\n".join(lines)


def cv_folds(cv_dir: Path) -> list[Path]:
    """The fold models of a CV run folder (cv.py): fold_<k>/best, in fold order."""
    folds = sorted(cv_dir.glob("fold_*/best"), key=lambda p: int(p.parent.name.split("_")[1]))
    folds = [f for f in folds if f.parent.name.split("_")[1].isdigit()]
    if not folds:
        raise UserError(f"--cv {cv_dir}: no fold_<k>/best folders; pass a folder written by cv.py")
    return folds


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", nargs="+", help="a model folder (runs/<name>/best), or several: an ensemble")
    who.add_argument("--cv", nargs="+", help="a cv.py run folder: every fold's best/ on its own validation cases (out "
                                             "of fold); several: their fold-by-fold ensemble (needs --out)")
    ap.add_argument("--data_dir", required=True, help="the data the models were trained on (their folds are inside)")
    ap.add_argument("--weights", default=None, help="ensemble weights, comma-separated (default: equal)")
    ap.add_argument("--out", default=None,
                    help="write the tuned values here (JSON for predict.py --tuned) instead of into the model specs; "
                         "needed for an ensemble")
    ap.add_argument("--search", default=",".join(SEARCH),
                    help=f"which steps to search, comma-separated (default {','.join(SEARCH)}); the others stay "
                         "untuned (e.g. thresholds,gates: no post-processing)")
    ap.add_argument("--empty_dice", default="1", choices=EMPTY_RULES, help="Dice of empty/empty pairs (default 1)")
    ap.add_argument("--cache_dir", default="cache", help="decode-once cache folder (default cache)")
    ap.add_argument("--batch_size", type=int, default=16, help="slices per forward pass (default 16)")
    ap.add_argument("--mixed_precision", default="bf16", choices=("no", "fp16", "bf16"),
                    help="autocast on GPU (default bf16; ignored on CPU)")
    ap.add_argument("--num_workers", type=int, default=2, help="data-loader workers (default 2)")
    ap.add_argument("--workers", type=int, default=0, help="threads scoring volumes (default: one per core)")
    return ap


def tune(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cv:
        per_cv = [cv_folds(Path(c)) for c in args.cv]
        folds = [[f.parent.name for f in fs] for fs in per_cv]
        if any(f != folds[0] for f in folds):
            raise UserError(f"--cv: the folders hold different folds ({folds}); an ensemble needs the same ones")
        groups = [list(g) for g in zip(*per_cv)]  # fold k's model(s) predict fold k's validation cases
        folders = [f for g in groups for f in g]
        if len(per_cv) > 1 and not args.out:
            raise UserError("tuning an ensemble of several CVs needs --out <file.json>; predict.py --tuned uses it")
    else:
        folders = [Path(m) for m in args.model]
        groups = [folders]
        if len(folders) > 1 and not args.out:
            raise UserError("tuning an ensemble needs --out <file.json> (its members' own specs stay as they are); "
                            "predict.py --tuned <file.json> then uses it")
    weights = None
    if args.weights:
        from predict import parse_weights
        weights = parse_weights(args.weights, len(groups[0]))
    volumes, spec, adapter, index = [], None, None, None
    for group in groups:
        model = Ensemble.load(group, device, weights)
        if spec is None:
            spec = model.spec
            adapter = get_adapter(spec.dataset, f"--model {group[0]}").bind(args.data_dir, spec.dataset_options or {},
                                                                            spec.classes)
            index = adapter.build_index(args.data_dir)
        splits = {json.dumps(m.spec.split, sort_keys=True) for m in model.members}
        if len(splits) > 1 or model.spec.split is None:
            raise UserError(f"--model {group[0]}: the members must share a known training split to be tuned on its "
                            f"validation cases, got {sorted(splits)}")
        s = model.spec.split
        _, rows = split_by_case(index, s["fold"], s["n_folds"], s["split_seed"])
        logger.info("predicting %d validation slices (fold %d/%d) with %s", len(rows), s["fold"], s["n_folds"],
                    ", ".join(map(str, group)))
        volumes += collect_volumes(model, adapter, index, rows, args.cache_dir, args.batch_size, args.mixed_precision,
                                   args.num_workers)
    search = tuple(s for s in args.search.split(",") if s)
    if not search or set(search) - set(SEARCH):
        raise UserError(f"--search takes steps of {SEARCH}, comma-separated; got {args.search!r}")
    tuner = Tuner(volumes, spec.task, spec.classes, args.empty_dice, args.workers or os.cpu_count() or 1, search)
    chosen, before, after = tuner.search(start_decisions(spec))
    values = as_spec_values(chosen, spec.task)
    source = (f"out-of-fold validation of {', '.join(args.cv)}" if args.cv else
              f"validation of {', '.join(map(str, folders))}")
    report = {"source": source, "models": [str(f) for f in folders], "weights": weights, "decisions": values,
              "search": list(search),
              "before": before, "after": after, "candidates_scored": tuner.evaluated, "empty_dice": args.empty_dice}
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, report)
        atomic_write_text(out.with_suffix(".md"), report_markdown(spec.classes, chosen, before, after, spec.task, source))
    else:
        for folder in folders:
            tuned = dataclasses.replace(InferenceSpec.load(folder), **values)
            tuned.save(folder)
        where = Path(args.cv[0]) if args.cv else folders[0].parent
        atomic_write_json(where / "tuning.json", report)
        atomic_write_text(where / "tuning.md", report_markdown(spec.classes, chosen, before, after, spec.task, source))
    logger.info("tuned on %d slices in %d volumes (%d candidates scored): score %.4f -> %.4f, mean Dice %.4f -> %.4f, "
                "Hausdorff %.4f -> %.4f; saved in %s", before["n_slices"], before["n_volumes"], tuner.evaluated,
                before["score"], after["score"], before["dice_mean"], after["dice_mean"], before["hausdorff"],
                after["hausdorff"], args.out or ", ".join(f"{f}/inference_spec.json" for f in folders))
    return report


def read_tuned(path: str | Path) -> dict:
    """The decisions of a tune.py --out file (predict.py --tuned)."""
    try:
        values = json.loads(Path(path).read_text())["decisions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--tuned {path}: not a tune.py --out file ({e})") from None
    return {k: tuple(values[k]) for k in DECISIONS if k in values}


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(True)
    quiet_third_party()
    tune(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
