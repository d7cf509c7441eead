"""Per-class Dice of UW-Madison GI-tract organ masks, as a Hugging Face `evaluate` module.

    import evaluate
    dice = evaluate.load("path/to/gi_dice")          # offline: the folder and this script share a name
    dice.compute(predictions=[pred_masks, ...], references=[true_masks, ...], empty_dice="1")

Each prediction / reference is one slice: a (3, H, W) 0/1 array for large_bowel, small_bowel, stomach.
Returns dice_<class> (per-slice mean), dice_mean, global_dice_<class> (all pixels pooled) and global_dice_mean,
the same figures as the toolkit's evaluation/metrics.py. ``empty_dice``: the Dice of an empty prediction on an empty truth,
"1" (default), "0" or "skip" (left out of the mean).

This file is self-contained (numpy only) because `evaluate` copies it into its module cache.
"""
import datasets
import evaluate
import numpy as np

CLASSES = ("large_bowel", "small_bowel", "stomach")

_KWARGS = """
Args:
    predictions: list of (3, H, W) 0/1 masks.
    references: list of (3, H, W) 0/1 masks, same shapes.
    empty_dice: "1", "0" or "skip".
Returns:
    dict with dice_<class>, dice_mean, global_dice_<class>, global_dice_mean.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS)
class GiDice(evaluate.Metric):
    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))))
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": mask, "references": mask}))

    def _compute(self, predictions, references, empty_dice="1"):
        if empty_dice not in ("1", "0", "skip"):
            raise ValueError(f"empty_dice must be '1', '0' or 'skip', got {empty_dice!r}")
        stats = []
        for p, t in zip(predictions, references):
            p, t = np.asarray(p, bool), np.asarray(t, bool)
            if p.shape != t.shape or p.ndim != 3 or p.shape[0] != len(CLASSES):
                raise ValueError(f"each mask must be (3, H, W) and shapes must match, got {p.shape} and {t.shape}")
            stats.append(np.stack([(p & t).sum((1, 2)), p.sum((1, 2)), t.sum((1, 2))], -1))
        s = np.asarray(stats, dtype=np.float64)  # (N, 3, 3)
        fill = {"1": 1.0, "0": 0.0, "skip": np.nan}[empty_dice]

        def dice(x):
            denom = x[..., 1] + x[..., 2]
            return np.where(denom > 0, 2 * x[..., 0] / np.where(denom > 0, denom, 1), fill)

        per_slice = dice(s)
        pooled = dice(s.sum(0))
        out = {}
        for c, name in enumerate(CLASSES):
            col = per_slice[:, c]
            out[f"dice_{name}"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
            out[f"global_dice_{name}"] = float(pooled[c])
        means = [out[f"dice_{n}"] for n in CLASSES]
        out["dice_mean"] = float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")
        out["global_dice_mean"] = float(np.nanmean(pooled))
        return out
